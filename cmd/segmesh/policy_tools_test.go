package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runCLI runs the segmesh command line in-process and returns its standard
// output, the message main would print to standard error and the exit code.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	out, _, msg, code := execCLI(args)
	return out, msg, code
}

// execCLI runs the command line and returns its standard output, what it wrote
// to standard error, the exit message main would print and the exit code.
func execCLI(args []string) (stdout, stderr, msg string, code int) {
	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err := root.Execute()
	var ee *exitError
	switch {
	case err == nil:
		return out.String(), errOut.String(), errOut.String(), 0
	case errors.As(err, &ee):
		return out.String(), errOut.String(), ee.msg, ee.code
	default:
		return out.String(), errOut.String(), "segmesh: " + err.Error(), 2
	}
}

// brokenRules widens db-syslog (examples/policy.yaml:50) so that the database
// may send syslog to the front ends: the policy is valid, its tests fail.
func brokenRules(example string) string {
	return strings.Replace(example, "    to: [ops]\n    ports: [udp/514]", "    to: [ops, web]\n    ports: [udp/514]", 1)
}

// brokenSyntax has one mistake of each kind a policy author makes.
func brokenSyntax(example string) string {
	r := strings.NewReplacer(
		"    to: [api]\n    ports: [tcp/8080]", "    to: [apis]\n    ports: [8080]",
		"      - {role: db}", "      - {role: db}\n    cidrs: [10.1.0.0/8]",
		"    from: api\n    to: db\n", "    from: api\n    to: \"fd5e:6d65:7368::4:5432\"\n",
	)
	return r.Replace(example)
}

// withWarnings adds to the example policy a segment whose selector no lab node
// matches, with a rule from it, and a segment naming a node that is not in the lab.
func withWarnings(example string) string {
	return strings.NewReplacer(
		"      - {role: ops}\n", "      - {role: ops}\n  - name: admins\n    nodes: [ops-1, opz-2]\n  - name: staging\n    selectors:\n      - {role: web, env: staging}\n",
		"rules:\n", "rules:\n  - name: staging-to-api\n    from: [staging]\n    to: [api]\n    ports: [tcp/8080]\n",
	).Replace(example)
}

// setupFiles writes the example policy, its broken copies, a changed copy and
// the lab inventory into a temporary directory and makes it the working directory.
func setupFiles(t *testing.T) {
	t.Helper()
	example, err := os.ReadFile("../../examples/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := os.ReadFile("../../policy/testdata/nodes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	changed := strings.NewReplacer("    ports: [tcp/5432]", "    ports: [tcp/5432, tcp/6432]", "ports: [tcp/22, icmp]", "ports: [tcp/22]").Replace(string(example))
	for name, content := range map[string]string{
		"policy.yaml":          string(example),
		"broken-rules.yaml":    brokenRules(string(example)),
		"broken-syntax.yaml":   brokenSyntax(string(example)),
		"changed.yaml":         changed,
		"warnings.yaml":        withWarnings(string(example)),
		"broken-warnings.yaml": withWarnings(brokenRules(string(example))),
		"nodes.yaml":           string(nodes),
		"bad-nodes.yaml":       "nodes:\n  - {name: a, addresses: [100.64.0.1]}\n  - {name: b, addresses: [100.64.0.1, 100.64.0.0/24]}\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Chdir(dir)
}

type cliCase struct {
	args      []string
	code      int
	out, errs string
}

func runCases(t *testing.T, tests []cliCase) {
	t.Helper()
	for _, tt := range tests {
		out, errs, code := runCLI(t, tt.args...)
		if code != tt.code || out != tt.out || errs != tt.errs {
			t.Errorf("segmesh %s: exit %d\nstdout:\n%s\nstderr:\n%s\nwant exit %d\nstdout:\n%s\nstderr:\n%s",
				strings.Join(tt.args, " "), code, out, errs, tt.code, tt.out, tt.errs)
		}
	}
}

const brokenSyntaxErrors = `broken-syntax.yaml:29:5: a segment holds either nodes (selectors, nodes) or external addresses (cidrs), not both
broken-syntax.yaml:29:13: cidr 10.1.0.0/8 has host bits set (did you mean 10.0.0.0/8?)
broken-syntax.yaml:38:10: undefined segment "apis" (did you mean "api"?)
broken-syntax.yaml:39:13: port 8080 has no protocol; did you mean tcp/8080 or udp/8080?
broken-syntax.yaml:70:9: to: ambiguous IPv6 address "fd5e:6d65:7368::4:5432": write [fd5e:6d65:7368::4]:5432 for port 5432 of fd5e:6d65:7368::4, or [fd5e:6d65:7368::4:5432] for the address
broken-syntax.yaml: 5 error(s)`

const badNodesErrors = "bad-nodes.yaml:3:27: nodes \"a\" and \"b\" both hold overlay address 100.64.0.1\n" +
	"bad-nodes.yaml:3:39: address \"100.64.0.0/24\" is a prefix; write the node's overlay address without /BITS (routed prefixes go in routes)\n" +
	"bad-nodes.yaml: 2 error(s)"

func TestPolicyCheckCLI(t *testing.T) {
	setupFiles(t)
	runCases(t, []cliCase{
		{[]string{"policy", "check", "policy.yaml"}, 0,
			"policy.yaml: ok (4 segments, 4 rules, 7 tests passed on the prototype inventory)\n", ""},
		{[]string{"policy", "check", "--inventory", "nodes.yaml", "policy.yaml"}, 0,
			"policy.yaml: ok (4 segments, 4 rules, 7 tests passed on the prototype inventory and 5 nodes)\n", ""},
		{[]string{"policy", "check", "--inventory", "nodes.yaml", "broken-rules.yaml"}, 1, "",
			`broken-rules.yaml:85:5: test "db-reaches-only-ops": role=db#1 -> role=web#1 udp/514 is allowed by rule db-syslog (broken-rules.yaml:50:5), want flows only to ops (prototype inventory)
broken-rules.yaml:85:5: test "db-reaches-only-ops": db-1 -> web-1 udp/514 is allowed by rule db-syslog (broken-rules.yaml:50:5), want flows only to ops
broken-rules.yaml: 1 of 7 tests failed`},
		{[]string{"policy", "check", "broken-syntax.yaml", "policy.yaml"}, 1,
			"policy.yaml: ok (4 segments, 4 rules, 7 tests passed on the prototype inventory)\n", brokenSyntaxErrors},
		{[]string{"policy", "check", "--inventory", "bad-nodes.yaml", "policy.yaml"}, 1, "", badNodesErrors +
			"\npolicy.yaml: valid; tests not run: the inventory bad-nodes.yaml has errors"},
		// A bad inventory does not hide the problems of the policy files.
		{[]string{"policy", "check", "--inventory", "bad-nodes.yaml", "broken-syntax.yaml", "policy.yaml"}, 1, "", badNodesErrors + "\n" + brokenSyntaxErrors +
			"\npolicy.yaml: valid; tests not run: the inventory bad-nodes.yaml has errors"},
		{[]string{"policy", "check", "missing.yaml"}, 2, "", "segmesh: open missing.yaml: no such file or directory"},
		{[]string{"policy", "check", "--inventory", "missing.yaml", "policy.yaml"}, 2, "", "segmesh: open missing.yaml: no such file or directory"},
		{[]string{"policy", "check"}, 2, "", "segmesh: requires at least 1 arg(s), only received 0"},
	})
}

func TestPolicyExplainCLI(t *testing.T) {
	setupFiles(t)
	runCases(t, []cliCase{
		{[]string{"policy", "explain", "policy.yaml", "--inventory", "nodes.yaml", "--from", "web-1", "--to", "db-1", "--port", "tcp/5432"}, 0,
			`web-1 -> db-1 tcp/5432: denied
  denied: web-1 -> db-1 over IPv4 and IPv6
    no rule allows it
    closest: rule api-to-db (policy.yaml:40:5) matches to, packet; from: web-1 is not in api
    closest: rule web-to-api (policy.yaml:35:5) matches from; to: db-1 is not in api; packet: tcp/5432 is not in tcp/8080
    closest: rule ops-admin (policy.yaml:45:5) matches to; from: web-1 is not in ops; packet: tcp/5432 is not in icmp tcp/22
`, ""},
		{[]string{"policy", "explain", "policy.yaml", "--inventory", "nodes.yaml", "--from", "api", "--to", "db-1:5432", "--port", "tcp"}, 0,
			"api -> db-1 tcp/5432: allowed\n  allowed: api-1 -> db-1 over IPv4 and IPv6\n    by rule api-to-db (policy.yaml:40:5)\n", ""},
		{[]string{"policy", "explain", "broken-rules.yaml", "--inventory", "nodes.yaml", "--from", "db", "--to", "web", "--port", "udp/514"}, 0,
			"db -> web udp/514: allowed\n  allowed: db-1 -> web-1 over IPv4 and IPv6, db-1 -> web-2 over IPv4 and IPv6\n    by rule db-syslog (broken-rules.yaml:50:5)\n", ""},
		{[]string{"policy", "explain", "policy.yaml", "--inventory", "nodes.yaml", "--from", "web-1", "--to", "fd5e:6d65:7368::3:8080", "--port", "tcp"}, 2, "",
			`segmesh: explain: to: ambiguous IPv6 address "fd5e:6d65:7368::3:8080": write [fd5e:6d65:7368::3]:8080 for port 8080 of fd5e:6d65:7368::3, or [fd5e:6d65:7368::3:8080] for the address`},
		{[]string{"policy", "explain", "broken-syntax.yaml", "--inventory", "nodes.yaml", "--from", "web", "--to", "api", "--port", "tcp/8080"}, 2, "", brokenSyntaxErrors},
		{[]string{"policy", "explain", "policy.yaml", "--inventory", "nodes.yaml", "--from", "web", "--to", "api", "--port", "tcp/8080", "-o", "xml"}, 2, "",
			`segmesh: invalid argument "xml" for "-o, --output" flag: want table, json or yaml`},
	})
	out, _, code := runCLI(t, "policy", "explain", "policy.yaml", "--inventory", "nodes.yaml", "--from", "web", "--to", "[fd5e:6d65:7368::3]:8080", "--port", "tcp", "-o", "json")
	var x struct {
		Verdict string `json:"verdict"`
		Cases   []struct {
			Flows []string `json:"flows"`
			Rules []struct{ Name, Pos string }
		} `json:"cases"`
	}
	if err := json.Unmarshal([]byte(out), &x); err != nil || code != 0 {
		t.Fatalf("explain -o json: exit %d, %v\n%s", code, err, out)
	}
	if x.Verdict != "allowed" || len(x.Cases) != 1 || strings.Join(x.Cases[0].Flows, ",") != "web-1 -> api-1 over IPv6,web-2 -> api-1 over IPv6" ||
		x.Cases[0].Rules[0].Pos != "policy.yaml:35:5" {
		t.Errorf("explain -o json = %s", out)
	}
	// -o yaml is the same document.
	yout, _, code := runCLI(t, "policy", "explain", "policy.yaml", "--inventory", "nodes.yaml", "--from", "web", "--to", "[fd5e:6d65:7368::3]:8080", "--port", "tcp", "-o", "yaml")
	if code != 0 || !strings.Contains(yout, "verdict: allowed") || !strings.Contains(yout, "pos: policy.yaml:35:5") {
		t.Errorf("explain -o yaml: exit %d\n%s", code, yout)
	}
}

func TestPolicyDiffCLI(t *testing.T) {
	setupFiles(t)
	runCases(t, []cliCase{
		{[]string{"policy", "diff", "policy.yaml", "policy.yaml"}, 0,
			"policy.yaml -> policy.yaml on prototype inventory:\nidentical: no flow and no peer changes\n", ""},
		{[]string{"policy", "diff", "policy.yaml", "changed.yaml", "--inventory", "nodes.yaml"}, 1, `policy.yaml -> changed.yaml on nodes.yaml:
flows added:
  + api -> db tcp/6432 (1 flow: api-1 -> db-1) by rule api-to-db (changed.yaml:40:5)
flows removed:
  - ops -> api icmp (1 flow: ops-1 -> api-1) by rule ops-admin (policy.yaml:45:5)
  - ops -> db icmp (1 flow: ops-1 -> db-1) by rule ops-admin (policy.yaml:45:5)
  - ops -> web icmp (2 flows: ops-1 -> web-1, ops-1 -> web-2) by rule ops-admin (policy.yaml:45:5)
`, ""},
		{[]string{"policy", "diff", "policy.yaml", "broken-rules.yaml"}, 1, `policy.yaml -> broken-rules.yaml on prototype inventory:
flows added:
  + db -> web udp/514 (4 flows: role=db#1 -> role=web#1, role=db#1 -> role=web#2, role=db#2 -> role=web#1, role=db#2 -> role=web#2) by rule db-syslog (broken-rules.yaml:50:5)
peers:
  role=db#1: +role=web#1 +role=web#2
  role=db#2: +role=web#1 +role=web#2
  role=web#1: +role=db#1 +role=db#2
  role=web#2: +role=db#1 +role=db#2
`, ""},
		{[]string{"policy", "diff", "policy.yaml", "broken-syntax.yaml"}, 2, "", brokenSyntaxErrors},
		{[]string{"policy", "diff", "policy.yaml", "changed.yaml", "--inventory", "bad-nodes.yaml"}, 2, "",
			"bad-nodes.yaml:3:27: nodes \"a\" and \"b\" both hold overlay address 100.64.0.1\n" +
				"bad-nodes.yaml:3:39: address \"100.64.0.0/24\" is a prefix; write the node's overlay address without /BITS (routed prefixes go in routes)\n" +
				"bad-nodes.yaml: 2 error(s)"},
		{[]string{"policy", "diff", "policy.yaml"}, 2, "", "segmesh: accepts 2 arg(s), received 1"},
	})
	out, _, code := runCLI(t, "policy", "diff", "policy.yaml", "broken-rules.yaml", "-o", "json")
	var d struct {
		Identical bool `json:"identical"`
		Added     []struct {
			From, To, Ports string
			Count           int
		} `json:"added"`
		Peers []struct {
			Node  string   `json:"node"`
			Added []string `json:"added"`
		} `json:"peers"`
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil || code != 1 {
		t.Fatalf("diff -o json: exit %d, %v\n%s", code, err, out)
	}
	if d.Identical || len(d.Added) != 1 || d.Added[0].From != "db" || d.Added[0].To != "web" || d.Added[0].Ports != "udp/514" || d.Added[0].Count != 4 || len(d.Peers) != 4 {
		t.Errorf("diff -o json = %s", out)
	}
}

// runCLIStderr is runCLI with everything the command line writes to standard
// error, in the order main prints it: what the command wrote, then its exit message.
func runCLIStderr(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	out, errOut, msg, code := execCLI(args)
	if code == 0 {
		return out, errOut, 0
	}
	return out, errOut + msg, code
}

// checkWarnings are the warnings of warnings.yaml (or FILE.yaml) on the lab inventory.
func checkWarnings(file string) string {
	return strings.ReplaceAll(`FILE:33:20: warning: segment "admins" names node "opz-2", which is not in the inventory (did you mean "ops-1"?)
FILE:34:5: warning: segment "staging" selects no node of the inventory (no node has the label env=staging)
FILE:40:5: warning: rule "staging-to-api" allows nothing: its from selects no node of the inventory (segment "staging" is empty)
`, "FILE", file)
}

// TestPolicyCheckWarningsCLI checks that with --inventory, what selects no node
// is a positioned warning on standard error and the check still passes; without
// an inventory there is nothing to warn about.
func TestPolicyCheckWarningsCLI(t *testing.T) {
	setupFiles(t)
	for _, tt := range []cliCase{
		{[]string{"policy", "check", "warnings.yaml"}, 0,
			"warnings.yaml: ok (6 segments, 5 rules, 7 tests passed on the prototype inventory)\n", ""},
		{[]string{"policy", "check", "--inventory", "nodes.yaml", "warnings.yaml", "policy.yaml"}, 0,
			"warnings.yaml: ok (6 segments, 5 rules, 7 tests passed on the prototype inventory and 5 nodes; 3 warnings)\n" +
				"policy.yaml: ok (4 segments, 4 rules, 7 tests passed on the prototype inventory and 5 nodes)\n",
			checkWarnings("warnings.yaml")},
		// Warnings come with the failures of the tests, and do not hide them.
		{[]string{"policy", "check", "--inventory", "nodes.yaml", "broken-warnings.yaml"}, 1, "",
			checkWarnings("broken-warnings.yaml") +
				`broken-warnings.yaml:94:5: test "db-reaches-only-ops": role=db#1 -> env=staging,role=web#1 udp/514 is allowed by rule db-syslog (broken-warnings.yaml:59:5), want flows only to ops (prototype inventory)
broken-warnings.yaml:94:5: test "db-reaches-only-ops": db-1 -> web-1 udp/514 is allowed by rule db-syslog (broken-warnings.yaml:59:5), want flows only to ops
broken-warnings.yaml: 1 of 7 tests failed`},
		// No warnings from an invalid inventory: there is nothing to check against.
		{[]string{"policy", "check", "--inventory", "bad-nodes.yaml", "warnings.yaml"}, 1, "", badNodesErrors +
			"\nwarnings.yaml: valid; tests not run: the inventory bad-nodes.yaml has errors"},
	} {
		out, errs, code := runCLIStderr(t, tt.args...)
		if code != tt.code || out != tt.out || errs != tt.errs {
			t.Errorf("segmesh %s: exit %d\nstdout:\n%s\nstderr:\n%s\nwant exit %d\nstdout:\n%s\nstderr:\n%s",
				strings.Join(tt.args, " "), code, out, errs, tt.code, tt.out, tt.errs)
		}
	}
}
