package policy

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

func TestDiff(t *testing.T) {
	data, err := os.ReadFile("../examples/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	example := string(data)
	edit := func(pairs ...string) string {
		s := example
		for i := 0; i < len(pairs); i += 2 {
			if !strings.Contains(s, pairs[i]) {
				t.Fatalf("examples/policy.yaml no longer holds %q", pairs[i])
			}
			s = strings.Replace(s, pairs[i], pairs[i+1], 1)
		}
		return s
	}
	// testInventory's web-3 has no IPv6 address: no flow from an IPv6 partner reaches it.
	tests := []struct {
		name      string
		new       string
		inventory bool
		want      string
	}{
		{"comments and order only", edit("# Front ends call the API;", "# (reworded) Front ends call the API;",
			"  - name: web-to-api\n    from: [web]\n    to: [api]\n    ports: [tcp/8080]\n", "",
			"  - name: db-syslog\n", "  - name: web-to-api\n    from: [web]\n    to: [api]\n    ports: [tcp/8080]\n  - name: db-syslog\n"), true,
			"identical: no flow and no peer changes\n"},
		{"equivalent ports", edit("ports: [tcp/22, icmp]", "ports: [icmp, tcp/22, tcp/22-22]"), false,
			"identical: no flow and no peer changes\n"},
		{"ports changed", edit("    ports: [tcp/5432]", "    ports: [tcp/5433]", "ports: [tcp/22, icmp]", "ports: [tcp/22, tcp/2222, icmp]"), true, `flows added:
  + api -> db tcp/5433 (1 flow: api-1 -> db-1) by rule api-to-db (new.yaml:40:5)
  + ops -> api tcp/2222 (1 flow: ops-1 -> api-1) by rule ops-admin (new.yaml:45:5)
  + ops -> db tcp/2222 (1 flow: ops-1 -> db-1) by rule ops-admin (new.yaml:45:5)
  + ops -> web tcp/2222 (3 flows: ops-1 -> web-1, ops-1 -> web-2, ops-1 -> web-3) by rule ops-admin (new.yaml:45:5)
flows removed:
  - api -> db tcp/5432 (1 flow: api-1 -> db-1) by rule api-to-db (policy.yaml:40:5)
`},
		{"rule removed: flows and peers", edit("  - name: api-to-db\n    from: [api]\n    to: [db]\n    ports: [tcp/5432]\n", ""), true, `flows removed:
  - api -> db tcp/5432 (1 flow: api-1 -> db-1) by rule api-to-db (policy.yaml:40:5)
peers:
  api-1: -db-1
  db-1: -api-1
`},
		{"rule removed: peers stay", edit("  - name: db-syslog\n    from: [db]\n    to: [ops]\n    ports: [udp/514]", ""), true, `flows removed:
  - db -> ops udp/514 (1 flow: db-1 -> ops-1) by rule db-syslog (policy.yaml:50:5)
`},
		{"segment widened, prototype inventory", edit("      - {role: api}\n", "      - {role: api}\n      - {role: gateway}\n"), false, `flows added:
  + api -> db tcp/5432 (4 flows: role=gateway#1 -> role=db#1, role=gateway#1 -> role=db#2, role=gateway#2 -> role=db#1, role=gateway#2 -> role=db#2) by rule api-to-db (new.yaml:41:5)
  + ops -> api icmp tcp/22 (4 flows: role=ops#1 -> role=gateway#1, role=ops#1 -> role=gateway#2, role=ops#2 -> role=gateway#1, role=ops#2 -> role=gateway#2) by rule ops-admin (new.yaml:46:5)
  + web -> api tcp/8080 (4 flows: role=web#1 -> role=gateway#1, role=web#1 -> role=gateway#2, role=web#2 -> role=gateway#1, role=web#2 -> role=gateway#2) by rule web-to-api (new.yaml:36:5)
peers:
  role=db#1: +role=gateway#1 +role=gateway#2
  role=db#2: +role=gateway#1 +role=gateway#2
  role=gateway#1: +role=db#1 +role=db#2 +role=ops#1 +role=ops#2 +role=web#1 +role=web#2
  role=gateway#2: +role=db#1 +role=db#2 +role=ops#1 +role=ops#2 +role=web#1 +role=web#2
  role=ops#1: +role=gateway#1 +role=gateway#2
  role=ops#2: +role=gateway#1 +role=gateway#2
  role=web#1: +role=gateway#1 +role=gateway#2
  role=web#2: +role=gateway#1 +role=gateway#2
relay users:
  ops-1: +role=gateway#1 +role=gateway#2
`},
		{"external segment added", edit("  - name: ops\n", "  - name: partner\n    cidrs: [192.0.2.0/24, \"2001:db8::/48\"]\n  - name: ops\n",
			"rules:\n", "rules:\n  - name: partner-in\n    from: [partner]\n    to: [web]\n    ports: [tcp/443]\n"), true, `flows added:
  + partner -> web tcp/443 (5 flows: 192.0.2.0/24 -> web-1, 192.0.2.0/24 -> web-2, 192.0.2.0/24 -> web-3, 2001:db8::/48 -> web-1, 2001:db8::/48 -> web-2) by rule partner-in (new.yaml:36:5)
`},
	}
	old := mustParse(t, "policy.yaml", example)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var inv []Node
			if tt.inventory {
				inv = testInventory(t)
			}
			d, err := Diff(old, mustParse(t, "new.yaml", tt.new), inv)
			if err != nil {
				t.Fatal(err)
			}
			if got := d.Text(); got != tt.want {
				t.Errorf("Diff:\n%s\nwant:\n%s", got, tt.want)
			}
			if d.Identical() != (tt.want == "identical: no flow and no peer changes\n") {
				t.Errorf("Identical = %v", d.Identical())
			}
		})
	}
}

func TestDiffJSON(t *testing.T) {
	old := mustParse(t, "old.yaml", "version: 1\nsegments:\n  - {name: a, nodes: [x]}\n  - {name: b, nodes: [y]}\nrules:\n  - {name: r, from: [a], to: [b], ports: [any]}\n")
	new := mustParse(t, "new.yaml", "version: 1\nsegments:\n  - {name: a, nodes: [x]}\n  - {name: b, nodes: [y]}\nrules:\n  - {name: r, from: [a], to: [b], ports: [tcp, udp, icmp]}\n")
	d, err := Diff(old, new, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"added":[],"removed":[{"from":"a","to":"b","ports":"other","rules":[{"name":"r","pos":"old.yaml:6:6"}],"count":1,"flows":["x -\u003e y"]}],"peers":[],"relays":[]}`
	if string(got) != want {
		t.Errorf("JSON:\n%s\nwant\n%s", got, want)
	}
	if _, err := Diff(old, nil, nil); err == nil {
		t.Errorf("Diff with a nil policy succeeded")
	}
	if _, err := Diff(old, new, []Node{node("x", nil, "100.64.0.1"), node("y", nil, "100.64.0.1")}); err == nil ||
		err.Error() != `diffing policies: old policy: nodes "x" and "y" both hold overlay address 100.64.0.1` {
		t.Errorf("Diff with an invalid inventory: %v", err)
	}
}
