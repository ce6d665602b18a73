package policy

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// testSegs is a policy prefix with segments and rules for the tests below:
//
//	web -> api tcp/8080; api -> db tcp/5432; ops -> web, api, db tcp/22 icmp;
//	db -> ops udp/514; partner (192.0.2.0/24, 2001:db8::/48) -> web tcp/443;
//	web -> web6 (only IPv6 overlay... see mixed) and admins (ops-1 by name).
const testSegs = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: api
    selectors: [{role: api}]
  - name: db
    selectors: [{role: db}]
  - name: ops
    selectors: [{role: ops}]
  - name: partner
    cidrs: [192.0.2.0/24]
  - name: admins
    nodes: [ops-1]
rules:
  - name: web-to-api
    from: [web]
    to: [api]
    ports: [tcp/8080]
  - name: api-to-db
    from: [api]
    to: [db]
    ports: [tcp/5432]
  - name: ops-admin
    from: [ops]
    to: [web, api, db]
    ports: [tcp/22, icmp]
  - name: db-syslog
    from: [db]
    to: [ops]
    ports: [udp/514]
  - name: partner-in
    from: [partner]
    to: [web]
    ports: [tcp/443]
tests:
`

// testSegsLines is the number of lines of testSegs: tests start at line testSegsLines+1.
var testSegsLines = strings.Count(testSegs, "\n")

func TestParseTestsErrors(t *testing.T) {
	l := func(n int) string { return "p.yaml:" + itoa(testSegsLines+n) }
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"not a list", "  x: 1\n", []string{l(1) + ":3: tests must be a list, got a mapping"}},
		{"entry not a mapping", "  - web\n", []string{l(1) + ":5: test must be a mapping, got a string"}},
		{"missing everything", "  - {name: t}\n", []string{
			l(1) + ":6: test is missing from (a segment, node or address)",
			l(1) + ":6: test needs to (with allow and/or deny) or only",
		}},
		{"unknown field and bad name", "  - name: T\n    from: web\n    to: api\n    allows: [tcp/1]\n", []string{
			l(1) + ":5: test needs allow or deny (lists of ports such as tcp/443, icmp or any)",
			l(1) + `:11: invalid test name "T": must match [a-z0-9][a-z0-9_-]{0,30}`,
			l(4) + `:5: unknown field "allows" in test (did you mean "allow"?)`,
		}},
		{"duplicate name", "  - {name: t, from: web, to: api, allow: [tcp/8080]}\n  - {name: t, from: web, to: api, allow: [tcp/8080]}\n", []string{
			l(2) + `:12: duplicate test "t" (first defined at ` + l(1) + `:6)`,
		}},
		{"wrong types", "  - name: t\n    from: 7\n    to: {a: b}\n    allow: tcp/1\n    deny: [22]\n", []string{
			l(2) + `:11: from must be a string, got an integer (quote it: "7")`,
			l(3) + ":10: to must be a string, got a mapping",
			l(4) + ":12: allow must be a list, got a string",
			l(5) + ":12: port 22 has no protocol; did you mean tcp/22 or udp/22?",
		}},
		{"empty lists", "  - name: t\n    from: web\n    to: api\n    allow: []\n    deny:\n", []string{
			l(4) + ":12: allow is empty; list at least one port such as tcp/443, icmp or any, or remove the field",
			l(5) + ":11: deny is empty; list at least one port such as tcp/443, icmp or any, or remove the field",
		}},
		{"allow and deny overlap", "  - name: t\n    from: web\n    to: api\n    allow: [tcp/8000-8100, icmp]\n    deny: [tcp/8080, udp, any]\n", []string{
			l(5) + ":12: tcp/8080 is both in allow and in deny",
			l(5) + ":27: icmp tcp/8000-8100 is both in allow and in deny",
		}},
		{"only with to", "  - name: t\n    from: web\n    to: api\n    only: [api]\n    deny: [any]\n", []string{
			l(3) + ":5: a test with only takes no to: an only test lists every target from may reach, on any port; write a separate test for to",
			l(5) + ":5: a test with only takes no deny: an only test lists every target from may reach, on any port; write a separate test for deny",
		}},
		{"only null", "  - name: t\n    from: web\n    only:\n", []string{
			l(3) + ":11: only needs a list of targets; write only: [] to assert that from reaches nothing",
		}},
		{"only mixes all", "  - name: t\n    from: web\n    only: [api, all]\n", []string{
			l(3) + `:17: "all" already holds every node; do not combine it with other targets in only`,
		}},
		{"endpoints with ports and bad addresses", "  - name: t\n    from: \"100.64.0.1:22\"\n    to: \"2001:db8::1:443\"\n    allow: [tcp]\n" +
			"  - name: u\n    from: [fd5e::4]\n    only: [\"[fd5e::5]:1\", \"Web\"]\n", []string{
			l(2) + `:11: from "100.64.0.1:22" has a port; a test lists ports in allow and deny: write 100.64.0.1 and allow: [tcp/22] (or udp)`,
			l(3) + `:9: to: ambiguous IPv6 address "2001:db8::1:443": write [2001:db8::1]:443 for port 443 of 2001:db8::1, or [2001:db8::1:443] for the address`,
			l(6) + `:11: from must be a string, got a list; quote a bracketed IPv6 address: "[fd5e::4]"`,
			l(7) + `:12: only target "[fd5e::5]:1" has a port; a test lists ports in allow and deny: write fd5e::5 and allow: [tcp/1] (or udp)`,
			l(7) + `:27: only target: invalid endpoint "Web": want a segment name ([a-z0-9][a-z0-9_-]{0,30}), a node name ([a-z0-9][a-z0-9.-]{0,62}), an IPv4 address or an IPv6 address, optionally with :PORT ([IPV6]:PORT)`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("p.yaml", []byte(testSegs+tt.src))
			var list ErrorList
			if !errors.As(err, &list) {
				t.Fatalf("Parse error = %v, want an ErrorList", err)
			}
			if got := strings.Split(err.Error(), "\n"); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

func TestParseTestsValid(t *testing.T) {
	p := mustParse(t, "p.yaml", testSegs+`  - name: flow
    from: web
    to: "2001:db8::1"
    allow: [tcp/443]
    deny: [udp, icmp]
  - name: isolated
    from: db-1
    only: []
  - name: reach
    from: "[fd5e:6d65:7368::4]"
    only: [ops, 192.0.2.7]
`)
	want := []Test{
		{Name: "flow", Pos: Pos{"p.yaml", testSegsLines + 1, 5}, From: Endpoint{Name: "web"}, To: Endpoint{Addr: netip.MustParseAddr("2001:db8::1")},
			Allow: matches(t, "tcp/443"), Deny: matches(t, "udp", "icmp")},
		{Name: "isolated", Pos: Pos{"p.yaml", testSegsLines + 6, 5}, From: Endpoint{Name: "db-1"}, Only: []Endpoint{}},
		{Name: "reach", Pos: Pos{"p.yaml", testSegsLines + 9, 5}, From: Endpoint{Addr: netip.MustParseAddr("fd5e:6d65:7368::4")},
			Only: []Endpoint{{Name: "ops"}, {Addr: netip.MustParseAddr("192.0.2.7")}}},
	}
	if !reflect.DeepEqual(p.Tests, want) {
		t.Errorf("Tests =\n%+v\nwant\n%+v", p.Tests, want)
	}
	if p.Tests[0].IsOnly() || !p.Tests[1].IsOnly() {
		t.Errorf("IsOnly wrong")
	}
}

// testInventory is the lab inventory of examples/policy.yaml plus a batch node
// that no segment holds and an IPv4-only web node.
func testInventory(t testing.TB) []Node {
	t.Helper()
	data, err := os.ReadFile("testdata/nodes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := ParseInventory("nodes.yaml", data)
	if err != nil {
		t.Fatal(err)
	}
	return append(nodes,
		node("batch-1", map[string]string{"role": "batch"}, "100.64.0.6", "fd5e:6d65:7368::6"),
		node("web-3", map[string]string{"role": "web"}, "100.64.0.7"))
}

// TestRunTests checks each kind of assertion, passing and failing, on the
// prototype inventory and on testInventory, with the exact messages.
func TestRunTests(t *testing.T) {
	T := testSegsLines + 1                                             // line of the first test
	at := func(n int) string { return "p.yaml:" + itoa(T+n) + ":6: " } // flow-style entries: first key at column 6
	tests := []struct {
		name      string
		tests     string
		inventory bool
		want      []string
	}{
		{"flow tests pass", `  - {name: a, from: web, to: api, allow: [tcp/8080], deny: [tcp/8081, tcp/22, udp, icmp]}
  - {name: b, from: ops, to: db, allow: [tcp/22, icmp], deny: [tcp/5432]}
  - {name: c, from: partner, to: web, allow: [tcp/443], deny: [tcp/80]}
  - {name: d, from: web, to: web, deny: [any]}
`, true, nil},
		{"deny violated", `  - {name: a, from: ops, to: api, deny: [tcp/1-1024]}
`, true, []string{
			at(0) + `test "a": ops-1 -> role=api#1 tcp/22 is allowed by rule ops-admin (p.yaml:24:5), want deny (prototype inventory)`,
			at(0) + `test "a": ops-1 -> api-1 tcp/22 is allowed by rule ops-admin (p.yaml:24:5), want deny`,
		}},
		{"allow violated", `  - {name: a, from: web, to: api, allow: [tcp/8080-8081]}
`, false, []string{
			at(0) + `test "a": role=web#1 -> role=api#1 tcp/8081 is denied (no rule allows it), want allow (prototype inventory)`,
		}},
		{"an IPv4-only node has only IPv4 flows", `  - {name: a, from: ops, to: web, allow: [tcp/22]}
  - {name: b, from: partner, to: web-3, allow: [tcp/443]}
`, true, nil},
		{"external sources and family", `  - {name: a, from: partner, to: web, deny: [tcp/443]}
  - {name: b, from: "2001:db8::7", to: web, deny: [any]}
  - {name: c, from: 192.0.2.255, to: api, allow: [tcp/443]}
`, false, []string{
			at(0) + `test "a": 192.0.2.0-192.0.2.254 -> role=web#1 tcp/443 is allowed by rule partner-in (p.yaml:32:5), want deny (prototype inventory)`,
			at(2) + `test "c": 192.0.2.255 -> role=api#1 tcp/443 is denied (no rule allows it), want allow (prototype inventory)`,
		}},
		{"only tests", `  - {name: a, from: web, only: [api]}
  - {name: b, from: db, only: [ops]}
  - {name: c, from: ops, only: [web, api]}
  - {name: d, from: api, only: []}
  - {name: e, from: partner, only: [web]}
`, true, []string{
			at(2) + `test "c": ops-1 -> role=db#1 icmp is allowed by rule ops-admin (p.yaml:24:5), want flows only to web, api (prototype inventory)`,
			at(2) + `test "c": ops-1 -> db-1 icmp is allowed by rule ops-admin (p.yaml:24:5), want flows only to web, api`,
			at(3) + `test "d": role=api#1 -> role=db#1 tcp/5432 is allowed by rule api-to-db (p.yaml:20:5), want no flow at all (prototype inventory)`,
			at(3) + `test "d": api-1 -> db-1 tcp/5432 is allowed by rule api-to-db (p.yaml:20:5), want no flow at all`,
		}},
		{"only with node and address targets", `  - {name: a, from: api, only: [db-1]}
  - {name: b, from: api-1, only: [100.64.0.4]}
  - {name: c, from: api-1, only: ["fd5e:6d65:7368::4"]}
`, true, []string{
			// 100.64.0.4 holds db-1 for IPv4 only, fd5e:6d65:7368::4 for IPv6 only.
			at(1) + `test "b": api-1 -> db-1 tcp/5432 over IPv6 is allowed by rule api-to-db (p.yaml:20:5), want flows only to 100.64.0.4`,
			at(2) + `test "c": api-1 -> db-1 tcp/5432 over IPv4 is allowed by rule api-to-db (p.yaml:20:5), want flows only to fd5e:6d65:7368::4`,
		}},
		{"names that match nothing", `  - {name: a, from: wbe, to: api, allow: [tcp/8080]}
  - {name: b, from: web, to: api-9, allow: [tcp/8080]}
  - {name: c, from: web-1, to: api, allow: [tcp/8080]}
  - {name: d, from: web, only: [dbb]}
`, false, []string{
			at(0) + `test "a": from wbe matches no node of the prototype inventory (did you mean "web"?); a real node needs an inventory (segmesh policy check --inventory NODES.yaml) (prototype inventory)`,
			at(1) + `test "b": to api-9 matches no node of the prototype inventory (did you mean "api"?); a real node needs an inventory (segmesh policy check --inventory NODES.yaml) (prototype inventory)`,
			at(2) + `test "c": from web-1 matches no node of the prototype inventory (did you mean "web"?); a real node needs an inventory (segmesh policy check --inventory NODES.yaml) (prototype inventory)`,
			at(3) + `test "d": only target dbb matches no node of the prototype inventory (did you mean "db"?); a real node needs an inventory (segmesh policy check --inventory NODES.yaml) (prototype inventory)`,
		}},
		{"names that match nothing, with an inventory", `  - {name: a, from: wbe, to: api, allow: [tcp/8080]}
  - {name: c, from: web-1, to: api, allow: [tcp/8080]}
  - {name: d, from: admins, to: db, allow: [tcp/22]}
`, true, []string{
			at(0) + `test "a": from wbe is neither a segment nor a node (did you mean "web"?)`,
		}},
		{"overlay addresses no node holds, with an inventory", `  - {name: a, from: 100.64.0.99, to: db, deny: [any]}
  - {name: b, from: db, to: 100.64.0.99, deny: [any]}
  - {name: c, from: 100.64.0.99, only: []}
  - {name: d, from: web, to: "fd5e:6d65:7368::99", deny: [any]}
  - {name: e, from: web, only: [100.64.0.99]}
  - {name: f, from: 100.64.0.4, to: db-1, deny: [any]}
`, true, []string{
			at(0) + `test "a": from 100.64.0.99 matches no node: no node of the inventory holds this overlay address`,
			at(1) + `test "b": to 100.64.0.99 matches no node: no node of the inventory holds this overlay address`,
			at(2) + `test "c": from 100.64.0.99 matches no node: no node of the inventory holds this overlay address`,
			at(3) + `test "d": to fd5e:6d65:7368::99 matches no node: no node of the inventory holds this overlay address`,
			at(4) + `test "e": only target 100.64.0.99 matches no node: no node of the inventory holds this overlay address`,
			at(5) + `test "f": no flow from 100.64.0.4 to db-1: they hold no two distinct parties with a common address family`,
		}},
		{"tests between external parties", `  - {name: a, from: partner, to: partner, deny: [any]}
  - {name: b, from: 192.0.2.1, to: 192.0.2.2, deny: [any]}
  - {name: c, from: "2001:db8::1", to: 198.51.100.1, allow: [tcp/1]}
  - {name: d, from: partner, to: web, deny: [tcp/80]}
  - {name: e, from: 192.0.2.1, only: [web]}
`, true, []string{
			at(0) + `test "a": connects no node: from partner and to partner hold only external addresses, and the overlay filters only traffic of nodes (prototype inventory)`,
			at(1) + `test "b": connects no node: from 192.0.2.1 and to 192.0.2.2 hold only external addresses, and the overlay filters only traffic of nodes (prototype inventory)`,
			at(2) + `test "c": connects no node: from 2001:db8::1 and to 198.51.100.1 hold only external addresses, and the overlay filters only traffic of nodes (prototype inventory)`,
		}},
		{"segment without nodes in the inventory", `  - {name: a, from: ops, to: api, allow: [tcp/22]}
`, true, nil},
		{"no flow", `  - {name: a, from: db-1, to: db, deny: [any]}
  - {name: b, from: admins, to: admins, deny: [any]}
`, true, []string{
			at(0) + `test "a": no flow from db-1 to db: they hold no two distinct parties with a common address family`,
			at(1) + `test "b": no flow from admins to admins: they hold no two distinct parties with a common address family (prototype inventory)`,
			at(1) + `test "b": no flow from admins to admins: they hold no two distinct parties with a common address family`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustParse(t, "p.yaml", testSegs+tt.tests)
			var inv []Node
			if tt.inventory {
				inv = testInventory(t)
			}
			failures, err := RunTests(p, inv)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, f := range failures {
				got = append(got, f.Error())
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("failures:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

// TestRunTestsEmptySegment checks that a segment without a member in the
// inventory fails the test (NoMatch) rather than passing it vacuously.
func TestRunTestsEmptySegment(t *testing.T) {
	p := mustParse(t, "p.yaml", testSegs+"  - {name: a, from: ops, to: db, deny: [tcp/5432]}\n  - {name: b, from: db, only: [ops]}\n")
	inv := slices.DeleteFunc(testInventory(t), func(n Node) bool { return n.Labels["role"] == "ops" })
	failures, err := RunTests(p, inv)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"p.yaml:" + itoa(testSegsLines+1) + `:6: test "a": from ops matches no node`,
		"p.yaml:" + itoa(testSegsLines+2) + `:6: test "b": only target ops matches no node`,
	}
	if len(failures) != len(want) {
		t.Fatalf("failures = %v, want %q", failures, want)
	}
	for i, f := range failures {
		if !f.NoMatch || f.Inventory != InventoryRun || f.Error() != want[i] {
			t.Errorf("failure %+v, want %q with NoMatch on the inventory", f, want[i])
		}
	}
}

func TestRunTestsErrors(t *testing.T) {
	p := mustParse(t, "p.yaml", testSegs+"  - {name: a, from: ops, to: db, deny: [tcp/5432]}\n")
	if _, err := RunTests(p, []Node{node("a", nil, "100.64.0.1"), node("b", nil, "100.64.0.1")}); err == nil ||
		err.Error() != `running policy tests on the inventory inventory: nodes "a" and "b" both hold overlay address 100.64.0.1` {
		t.Errorf("RunTests with an invalid inventory: %v", err)
	}
	if _, err := RunTests(nil, nil); err == nil {
		t.Errorf("RunTests(nil) succeeded")
	}
	if f, err := RunTests(mustParse(t, "p.yaml", "version: 1\n"), nil); f != nil || err != nil {
		t.Errorf("RunTests of a policy without tests = %v, %v", f, err)
	}
}

// TestExampleTests checks that the tests of examples/policy.yaml pass on the
// prototype and on the lab inventory, and that each of them fails when the
// rule it guards is widened or removed.
func TestExampleTests(t *testing.T) {
	data, err := os.ReadFile("../examples/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p := mustParse(t, "policy.yaml", string(data))
	if len(p.Tests) < 5 {
		t.Fatalf("examples/policy.yaml has %d tests, want at least 5", len(p.Tests))
	}
	failures, err := RunTests(p, testInventory(t))
	if err != nil || len(failures) > 0 {
		t.Fatalf("example tests fail: %v %v", failures, err)
	}
	for _, mut := range []struct{ old, new string }{
		{"    to: [ops]\n    ports: [udp/514]", "    to: [ops, web]\n    ports: [udp/514]"},
		{"    to: [api]\n    ports: [tcp/8080]", "    to: [api]\n    ports: [tcp/8081]"},
		{"    ports: [tcp/22, icmp]", "    ports: [tcp/22, icmp, tcp/5432]"},
		{"    to: [db]\n    ports: [tcp/5432]", "    to: [db, web]\n    ports: [tcp/5432]"},
	} {
		if !strings.Contains(string(data), mut.old) {
			t.Fatalf("examples/policy.yaml no longer holds %q", mut.old)
		}
		q := mustParse(t, "policy.yaml", strings.Replace(string(data), mut.old, mut.new, 1))
		if failures, err := RunTests(q, nil); err != nil || len(failures) == 0 {
			t.Errorf("changing %q to %q fails no test of the example (%v)", mut.old, mut.new, err)
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestPolicyFilesPassTheirTests runs the tests of every policy under testdata
// and of the example on the prototype and on the JSON test inventory.
func TestPolicyFilesPassTheirTests(t *testing.T) {
	files, err := filepath.Glob("testdata/policies/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range append(files, "../examples/policy.yaml") {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		p := mustParse(t, filepath.Base(path), string(data))
		failures, err := RunTests(p, loadInventory(t, "testdata/inventory.json"))
		if err != nil || len(failures) > 0 {
			t.Errorf("%s: %v %v", path, failures, err)
		}
	}
}

// TestRunTestsNoMatch pins which failures are vacuous on the inventory
// (NoMatch): unknown names, segments without members and tests without a flow,
// but not a counterexample.
func TestRunTestsNoMatch(t *testing.T) {
	p := mustParse(t, "p.yaml", testSegs+`  - {name: typo, from: dbb, to: api, deny: [any]}
  - {name: empty, from: ops, to: api, deny: [udp]}
  - {name: noflow, from: db-1, to: db, deny: [any]}
  - {name: ghost, from: web, only: [db-9]}
  - {name: real, from: api, to: db, deny: [tcp/5432]}
  - {name: ghostaddr, from: 100.64.0.99, to: db, deny: [any]}
`)
	inv := slices.DeleteFunc(testInventory(t), func(n Node) bool { return n.Labels["role"] == "ops" })
	failures, err := RunTests(p, inv)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, f := range failures {
		if f.Inventory == InventoryRun {
			got[f.Test] = f.NoMatch
		}
	}
	want := map[string]bool{"typo": true, "empty": true, "noflow": true, "ghost": true, "real": false, "ghostaddr": true}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("NoMatch per failing test = %v, want %v (%v)", got, want, failures)
	}
}
