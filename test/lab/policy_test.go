package lab

import (
	"testing"
)

const testPolicy = `
version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: api
    selectors:
      - {role: api}
  - name: db
    selectors: [{role: db, tier: data}, {role: database}]
  - name: ops
    nodes: [ops-1]
  - name: internet
    cidrs: [0.0.0.0/0, {cidr: "::/0", except: ["fd00::/8"]}]
rules:
  - name: web-to-api
    from: [web]
    to: [api]
    ports: [tcp/8080]
  - name: api-to-db
    from: [api]
    to: [db]
    ports: [tcp/5000-5500]
  - name: ops-in
    from: [ops]
    to: [web, api, db]
    ports: [tcp/22, icmp]
  - name: db-logs
    from: [db]
    to: [ops]
    ports: [udp/514]
  - name: out
    from: [all]
    to: [internet]
    ports: [any]
  - name: ops-anything-to-web
    from: [ops]
    to: [web]
    ports: [udp]
`

func TestPolicyAllows(t *testing.T) {
	pol, err := ParsePolicy([]byte(testPolicy))
	if err != nil {
		t.Fatal(err)
	}
	web := NodeInfo{"web-1", map[string]string{"role": "web"}}
	api := NodeInfo{"api-1", map[string]string{"role": "api"}}
	db := NodeInfo{"db-1", map[string]string{"role": "db", "tier": "data"}}
	dbNoTier := NodeInfo{"db-2", map[string]string{"role": "db"}}
	db3 := NodeInfo{"db-3", map[string]string{"role": "database"}}
	ops := NodeInfo{"ops-1", nil}
	tests := []struct {
		src, dst NodeInfo
		check    Check
		want     bool
	}{
		{web, api, TCP8080, true},
		{web, api, TCP22, false},
		{api, web, TCP8080, false}, // rules are directional
		{web, api, Check{"udp", 8080}, false},
		{api, db, TCP5432, true}, // inside the range
		{api, db, Check{"tcp", 5000}, true},
		{api, db, Check{"tcp", 5501}, false},
		{api, dbNoTier, TCP5432, false}, // selector needs every label
		{api, db3, TCP5432, true},       // second selector is an alternative
		{ops, web, TCP22, true},         // explicit node names
		{ops, db, ICMP, true},
		{ops, web, Check{"udp", 9999}, true}, // bare protocol: every port
		{web, ops, ICMP, false},
		{db, ops, UDP514, true},
		{db, ops, Check{"tcp", 514}, false},
		{web, web, TCP8080, false},
		{web, db, Check{"tcp", 1}, false}, // the "any" rule goes to an external segment only
	}
	for _, tt := range tests {
		if got := pol.Allows(tt.src, tt.dst, tt.check); got != tt.want {
			t.Errorf("Allows(%s -> %s %s) = %v, want %v", tt.src.Name, tt.dst.Name, tt.check, got, tt.want)
		}
	}
	related := []struct {
		a, b NodeInfo
		want bool
	}{
		{web, api, true},
		{api, web, true}, // either direction
		{web, ops, true},
		{web, db, false},
		{web, NodeInfo{"web-2", map[string]string{"role": "web"}}, false},
		{db, ops, true},
	}
	for _, tt := range related {
		if got := pol.Related(tt.a, tt.b); got != tt.want {
			t.Errorf("Related(%s, %s) = %v, want %v", tt.a.Name, tt.b.Name, got, tt.want)
		}
	}
}

func TestParsePolicyRejects(t *testing.T) {
	tests := map[string]string{
		"no version":        "segments: []\n",
		"version 2":         "version: 2\n",
		"undefined segment": "version: 1\nrules:\n  - {name: r, from: [nope], to: [all], ports: [any]}\n",
		"bad port":          "version: 1\nrules:\n  - {name: r, from: [all], to: [all], ports: [sctp/1]}\n",
		"icmp with port":    "version: 1\nrules:\n  - {name: r, from: [all], to: [all], ports: [icmp/8]}\n",
		"reversed range":    "version: 1\nrules:\n  - {name: r, from: [all], to: [all], ports: [tcp/9-1]}\n",
		"not yaml":          "version: [1\n",
	}
	for name, src := range tests {
		if _, err := ParsePolicy([]byte(src)); err == nil {
			t.Errorf("%s: ParsePolicy accepted %q", name, src)
		}
	}
	if p, err := ParsePolicy([]byte("version: 1\n")); err != nil {
		t.Errorf("empty policy: %v", err)
	} else if p.Allows(NodeInfo{Name: "a"}, NodeInfo{Name: "b"}, ICMP) {
		t.Error("empty policy allows a flow")
	}
}

func TestParseRevision(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"3\n", 3, true},
		{"applied policy revision 12\n", 12, true},
		{"nothing", 0, false},
	}
	for _, tt := range tests {
		got, err := parseRevision(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseRevision(%q) = %d, %v; want %d, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestNodeStatusAddr(t *testing.T) {
	n := NodeStatus{Addresses: []string{"100.64.0.3/32", "fd5e:6d65:7368::3/128"}}
	if a, ok := n.Addr(4); !ok || a.String() != "100.64.0.3" {
		t.Errorf("Addr(4) = %v, %v", a, ok)
	}
	if a, ok := n.Addr(6); !ok || a.String() != "fd5e:6d65:7368::3" {
		t.Errorf("Addr(6) = %v, %v", a, ok)
	}
	bare := NodeStatus{Addresses: []string{"100.64.0.4"}}
	if a, ok := bare.Addr(4); !ok || a.String() != "100.64.0.4" {
		t.Errorf("bare Addr(4) = %v, %v", a, ok)
	}
	if _, ok := bare.Addr(6); ok {
		t.Error("bare Addr(6) found an address")
	}
}
