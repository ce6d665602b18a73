package policy

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

func examplePolicy(t testing.TB) *Policy {
	t.Helper()
	data, err := os.ReadFile("../examples/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return mustParse(t, "policy.yaml", string(data))
}

func TestExplain(t *testing.T) {
	p := examplePolicy(t)
	inv := testInventory(t)
	tests := []struct {
		q    Query
		want string
	}{
		{Query{"web-1", "db-1", "tcp/5432"}, `web-1 -> db-1 tcp/5432: denied
  denied: web-1 -> db-1 over IPv4 and IPv6
    no rule allows it
    closest: rule api-to-db (policy.yaml:40:5) matches to, packet; from: web-1 is not in api
    closest: rule web-to-api (policy.yaml:35:5) matches from; to: db-1 is not in api; packet: tcp/5432 is not in tcp/8080
    closest: rule ops-admin (policy.yaml:45:5) matches to; from: web-1 is not in ops; packet: tcp/5432 is not in icmp tcp/22
`},
		{Query{"api-1", "db-1:5432", "tcp"}, `api-1 -> db-1 tcp/5432: allowed
  allowed: api-1 -> db-1 over IPv4 and IPv6
    by rule api-to-db (policy.yaml:40:5)
`},
		{Query{"api", "fd5e:6d65:7368::4", "tcp/5432"}, `api -> fd5e:6d65:7368::4 tcp/5432: allowed
  allowed: api-1 -> db-1 over IPv6
    by rule api-to-db (policy.yaml:40:5)
`},
		{Query{"web", "api", "tcp/8080"}, `web -> api tcp/8080: allowed
  allowed: web-1 -> api-1 over IPv4 and IPv6, web-2 -> api-1 over IPv4 and IPv6, web-3 -> api-1 over IPv4
    by rule web-to-api (policy.yaml:35:5)
`},
		{Query{"ops", "all", "icmp"}, `ops -> all icmp: partly allowed
  allowed: ops-1 -> api-1 over IPv4 and IPv6, ops-1 -> db-1 over IPv4 and IPv6, ops-1 -> web-1 over IPv4 and IPv6, ops-1 -> web-2 over IPv4 and IPv6, ops-1 -> web-3 over IPv4
    by rule ops-admin (policy.yaml:45:5)
  denied: ops-1 -> batch-1 over IPv4 and IPv6
    no rule allows it
    closest: rule ops-admin (policy.yaml:45:5) matches from, packet; to: batch-1 is not in web, api, db
`},
		{Query{"db", "ops", "udp/514"}, `db -> ops udp/514: allowed
  allowed: db-1 -> ops-1 over IPv4 and IPv6
    by rule db-syslog (policy.yaml:50:5)
`},
		{Query{"batch-1", "192.0.2.1", "tcp/443"}, `batch-1 -> 192.0.2.1 tcp/443: denied
  denied: batch-1 -> 192.0.2.1 over IPv4
    no rule allows it
    no rule matches its source, destination or packet
`},
	}
	for _, tt := range tests {
		x, err := Explain(p, inv, tt.q)
		if err != nil {
			t.Errorf("%+v: %v", tt.q, err)
			continue
		}
		if got := x.Text(); got != tt.want {
			t.Errorf("%+v:\n%s\nwant:\n%s", tt.q, got, tt.want)
		}
	}
}

func TestExplainErrors(t *testing.T) {
	p := examplePolicy(t)
	inv := testInventory(t)
	tests := []struct {
		q    Query
		want string
	}{
		{Query{"web-1", "2001:db8::1:443", "tcp"}, `to: ambiguous IPv6 address "2001:db8::1:443": write [2001:db8::1]:443 for port 443 of 2001:db8::1, or [2001:db8::1:443] for the address`},
		{Query{"web-1:80", "db-1", "tcp/5432"}, `from "web-1:80" has a port; the policy matches destination ports only: drop :80`},
		{Query{"web-1", "db-1:5432", ""}, `to names port 5432 but no protocol: give tcp or udp`},
		{Query{"web-1", "db-1:5432", "tcp/5433"}, `to names port 5432 but the packet is tcp/5433; give one of them`},
		{Query{"web-1", "db-1:5432", "icmp"}, `to names port 5432 but the packet is icmp; give one of them`},
		{Query{"web-1", "db-1", ""}, `no packet: give one such as tcp/5432, udp/53 or icmp`},
		{Query{"web-1", "db-1", "any"}, `"any" is every packet; name one: tcp/PORT, udp/PORT or icmp`},
		{Query{"web-1", "db-1", "tcp"}, `"tcp" names no port; write tcp/PORT`},
		{Query{"wbe", "db-1", "tcp/1"}, `from: wbe is neither a segment nor a node (did you mean "web"?)`},
		{Query{"web-1", "db-2", "tcp/1"}, `to: db-2 is neither a segment nor a node (did you mean "db-1"?)`},
		{Query{"db-1", "db", "tcp/1"}, `no flow from db-1 to db: they hold no two distinct parties with a common address family`},
		// An IPv4 source and an IPv6 destination share no family.
		{Query{"100.64.0.3", "[fd5e:6d65:7368::4]:5432", "tcp"}, `no flow from 100.64.0.3 to fd5e:6d65:7368::4: they hold no two distinct parties with a common address family`},
	}
	for _, tt := range tests {
		if x, err := Explain(p, inv, tt.q); err == nil || err.Error() != tt.want {
			t.Errorf("%+v: %v, %v\nwant error %s", tt.q, x, err, tt.want)
		}
	}
	noOps := mustParse(t, "p.yaml", "version: 1\nsegments:\n  - {name: ops, selectors: [{role: nobody}]}\n")
	if _, err := Explain(noOps, inv, Query{"ops", "web-1", "tcp/22"}); err == nil || err.Error() != "from: ops matches no node" {
		t.Errorf("empty segment: %v", err)
	}
	if _, err := Explain(p, []Node{node("a", nil, "100.64.0.1"), node("a", nil)}, Query{"a", "a", "tcp/1"}); err == nil || err.Error() != `explaining: duplicate node name "a"` {
		t.Errorf("invalid inventory: %v", err)
	}
}

func TestExplainJSON(t *testing.T) {
	x, err := Explain(examplePolicy(t), testInventory(t), Query{"web-1", "db-1", "tcp/5432"})
	if err != nil {
		t.Fatal(err)
	}
	x.Cases[0].Closest = x.Cases[0].Closest[:1]
	var buf strings.Builder
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(x); err != nil {
		t.Fatal(err)
	}
	got := strings.TrimSpace(buf.String())
	want := `{"from":"web-1","to":"db-1","packet":"tcp/5432","verdict":"denied","cases":[{"allowed":false,"count":1,"flows":["web-1 -> db-1 over IPv4 and IPv6"],` +
		`"reason":"no rule allows it","closest":[{"rule":{"name":"api-to-db","pos":"policy.yaml:40:5"},"matches":["to","packet"],"mismatches":["from: web-1 is not in api"]}]}]}`
	if got != want {
		t.Errorf("JSON:\n%s\nwant\n%s", got, want)
	}
}
