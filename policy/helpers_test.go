package policy

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
)

// renderView writes a NodeView in a stable, reviewable text form (golden files, diffs).
func renderView(name string, v NodeView) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node %s\n", name)
	fmt.Fprintf(&b, "  peers: %s\n", strings.Join(v.Peers, " "))
	for _, s := range v.Filter.Sets {
		ps := make([]string, len(s.Prefixes))
		for i, p := range s.Prefixes {
			ps[i] = p.String()
		}
		fmt.Fprintf(&b, "  set %s: %s\n", s.Name, strings.Join(ps, " "))
	}
	for _, d := range []struct {
		dir   string
		rules []FilterRule
	}{{"ingress from", v.Filter.Ingress}, {"egress to", v.Filter.Egress}} {
		for _, r := range d.rules {
			ms := make([]string, len(r.Matches))
			for i, m := range r.Matches {
				ms[i] = formatMatch(m)
			}
			fmt.Fprintf(&b, "  %s %s: %s  # %s\n", d.dir, r.Set, strings.Join(ms, " "), r.Origin)
		}
	}
	return b.String()
}

// renderCompiled renders every node of c.
func renderCompiled(c *Compiled) string {
	var b strings.Builder
	for _, n := range c.Nodes() {
		v, _ := c.Node(n)
		b.WriteString(renderView(n, v))
	}
	return b.String()
}

type jsonNode struct {
	Name      string            `json:"name"`
	Labels    map[string]string `json:"labels"`
	Addresses []netip.Addr      `json:"addresses"`
}

// loadInventory reads a JSON inventory: [{"name", "labels", "addresses"}].
func loadInventory(t testing.TB, path string) []Node {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var js []jsonNode
	if err := json.Unmarshal(data, &js); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	out := make([]Node, len(js))
	for i, n := range js {
		out[i] = Node{Name: n.Name, Labels: n.Labels, Addresses: n.Addresses}
	}
	return out
}

func mustParse(t testing.TB, name, src string) *Policy {
	t.Helper()
	p, err := Parse(name, []byte(src))
	if err != nil {
		t.Fatalf("Parse(%s):\n%v", name, err)
	}
	return p
}

func mustCompile(t testing.TB, p *Policy, nodes []Node) *Compiled {
	t.Helper()
	c, err := Compile(p, nodes)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return c
}

// formatMatch writes m in the policy file's syntax, ranges joined by commas:
// "any", "icmp", "tcp", "tcp/22", "tcp/22,8000-8100".
func formatMatch(m PortMatch) string {
	if len(m.Ports) == 0 {
		return string(m.Protocol)
	}
	parts := make([]string, len(m.Ports))
	for i, r := range m.Ports {
		if r.First == r.Last {
			parts[i] = strconv.Itoa(int(r.First))
		} else {
			parts[i] = fmt.Sprintf("%d-%d", r.First, r.Last)
		}
	}
	return string(m.Protocol) + "/" + strings.Join(parts, ",")
}
