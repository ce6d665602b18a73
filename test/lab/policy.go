package lab

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/goccy/go-yaml"
)

// Policy is the lab's own reading of a policy file (format version 1), kept apart
// from package policy on purpose: the matrix compares the implementation against
// this independent evaluation. It understands segments by selectors and node
// names, the built-in segment "all", and ports "any", "icmp", "tcp", "udp",
// "tcp/N", "tcp/A-B" (likewise udp). Segments with cidrs hold external addresses
// and therefore no lab node. It does not validate; run `segmesh policy check`.
type Policy struct {
	Version  int             `yaml:"version"`
	Segments []PolicySegment `yaml:"segments"`
	Rules    []PolicyRule    `yaml:"rules"`
}

// PolicySegment is one entry of a policy's segments list.
type PolicySegment struct {
	Name      string              `yaml:"name"`
	Selectors []map[string]string `yaml:"selectors"`
	Nodes     []string            `yaml:"nodes"`
	CIDRs     []any               `yaml:"cidrs"`
}

// PolicyRule is one entry of a policy's rules list.
type PolicyRule struct {
	Name  string   `yaml:"name"`
	From  []string `yaml:"from"`
	To    []string `yaml:"to"`
	Ports []string `yaml:"ports"`
}

// NodeInfo is what the evaluator knows of a node.
type NodeInfo struct {
	Name   string
	Labels map[string]string
}

// LoadPolicy reads and decodes a policy file; see ParsePolicy.
func LoadPolicy(path string) (*Policy, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("loading policy: %w", err)
	}
	p, err := ParsePolicy(b)
	if err != nil {
		return nil, fmt.Errorf("loading policy %s: %w", path, err)
	}
	return p, nil
}

// ParsePolicy decodes a policy file. It returns an error for YAML it cannot
// decode, a version other than 1, rules naming undefined segments and port
// entries it does not understand, so that the evaluator never guesses.
func ParsePolicy(data []byte) (*Policy, error) {
	var p Policy
	if err := yaml.Unmarshal(data, &p); err != nil {
		return nil, fmt.Errorf("decoding policy: %w", err)
	}
	if p.Version != 1 {
		return nil, fmt.Errorf("policy version %d, want 1", p.Version)
	}
	for _, r := range p.Rules {
		for _, s := range slices.Concat(r.From, r.To) {
			if s != "all" && p.segment(s) == nil {
				return nil, fmt.Errorf("rule %s: undefined segment %q", r.Name, s)
			}
		}
		for _, port := range r.Ports {
			if _, err := parsePortEntry(port); err != nil {
				return nil, fmt.Errorf("rule %s: %w", r.Name, err)
			}
		}
	}
	return &p, nil
}

func (p *Policy) segment(name string) *PolicySegment {
	for i := range p.Segments {
		if p.Segments[i].Name == name {
			return &p.Segments[i]
		}
	}
	return nil
}

// InSegment reports whether node n is a member of the named segment.
func (p *Policy) InSegment(name string, n NodeInfo) bool {
	if name == "all" {
		return true
	}
	s := p.segment(name)
	if s == nil || len(s.CIDRs) > 0 {
		return false
	}
	if slices.Contains(s.Nodes, n.Name) {
		return true
	}
	for _, sel := range s.Selectors {
		if len(sel) == 0 {
			continue
		}
		match := true
		for k, v := range sel {
			if got, ok := n.Labels[k]; !ok || got != v {
				match = false
				break
			}
		}
		if match {
			return true
		}
	}
	return false
}

func (p *Policy) inAny(segments []string, n NodeInfo) bool {
	for _, s := range segments {
		if p.InSegment(s, n) {
			return true
		}
	}
	return false
}

// Allows reports whether some rule allows a new flow from src to dst matching c
// (protocol and destination port; for ICMP, an echo request).
func (p *Policy) Allows(src, dst NodeInfo, c Check) bool {
	for _, r := range p.Rules {
		if !p.inAny(r.From, src) || !p.inAny(r.To, dst) {
			continue
		}
		for _, port := range r.Ports {
			m, _ := parsePortEntry(port)
			if m.matches(c) {
				return true
			}
		}
	}
	return false
}

// Related reports whether some rule allows any flow between a and b in either
// direction, i.e. whether each should hold the other as a WireGuard peer.
func (p *Policy) Related(a, b NodeInfo) bool {
	for _, r := range p.Rules {
		if p.inAny(r.From, a) && p.inAny(r.To, b) || p.inAny(r.From, b) && p.inAny(r.To, a) {
			return true
		}
	}
	return false
}

// portEntry is one decoded entry of a rule's ports: a protocol and an inclusive
// port range (first == 0 means every port).
type portEntry struct {
	proto       string
	first, last int
}

func parsePortEntry(s string) (portEntry, error) {
	proto, ports, hasPorts := strings.Cut(s, "/")
	switch proto {
	case "any", "icmp":
		if hasPorts {
			return portEntry{}, fmt.Errorf("port entry %q: %s takes no port", s, proto)
		}
		return portEntry{proto: proto}, nil
	case "tcp", "udp":
		if !hasPorts {
			return portEntry{proto: proto}, nil
		}
		a, b, isRange := strings.Cut(ports, "-")
		first, err := strconv.Atoi(a)
		if err != nil {
			return portEntry{}, fmt.Errorf("port entry %q: %w", s, err)
		}
		last := first
		if isRange {
			if last, err = strconv.Atoi(b); err != nil {
				return portEntry{}, fmt.Errorf("port entry %q: %w", s, err)
			}
		}
		if first < 1 || last > 65535 || first > last {
			return portEntry{}, fmt.Errorf("port entry %q: bad range", s)
		}
		return portEntry{proto: proto, first: first, last: last}, nil
	}
	return portEntry{}, fmt.Errorf("port entry %q: unknown protocol %q", s, proto)
}

func (e portEntry) matches(c Check) bool {
	switch e.proto {
	case "any":
		return true
	case "icmp":
		return c.Proto == "icmp"
	}
	if e.proto != c.Proto {
		return false
	}
	return e.first == 0 || e.first <= c.Port && c.Port <= e.last
}
