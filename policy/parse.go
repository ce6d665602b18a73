package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"

	"segmesh/policy/yamlpos"
)

// nameRE is the syntax of segment and rule names. It also keeps nftables set
// names derived from segment names (NAME_v4, NAME_v6) within the kernel's limit.
var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,30}$`)

const nameSyntax = "[a-z0-9][a-z0-9_-]{0,30}"

// Parse parses and validates a policy file (format version 1, YAML). filename
// only labels positions. On any problem it returns a nil Policy and an ErrorList
// holding every problem found, sorted by position, each at the offending key or
// value. A file holding only "version: 1" is a valid empty policy (it allows nothing).
func Parse(filename string, data []byte) (*Policy, error) {
	p := &fileParser{file: filename}
	pol := p.parseFile(data)
	if len(p.errs) > 0 {
		return nil, p.errs.sort()
	}
	return pol, nil
}

// fileParser walks the YAML AST of one policy file and collects errors.
type fileParser struct {
	file string
	errs ErrorList
}

func (p *fileParser) errorf(pos Pos, format string, args ...any) {
	p.errs = append(p.errs, &Error{Pos: pos, Msg: fmt.Sprintf(format, args...)})
}

// pos returns where n starts; for a mapping, its first key (1:1 when n has no
// position).
func (p *fileParser) pos(n ast.Node) Pos {
	if line, col, ok := yamlpos.Of(n); ok {
		return Pos{File: p.file, Line: line, Col: col}
	}
	return Pos{File: p.file, Line: 1, Col: 1}
}

// parseYAML runs the YAML parser, turning its syntax errors (and, defensively,
// its panics) into positioned errors.
func (p *fileParser) parseYAML(data []byte) (f *ast.File, ok bool) {
	defer func() {
		if r := recover(); r != nil {
			p.errorf(Pos{File: p.file, Line: 1, Col: 1}, "YAML parser failed: %v", r)
			f, ok = nil, false
		}
	}()
	f, err := parser.ParseBytes(data, 0)
	if err != nil {
		var yerr yaml.Error
		if errors.As(err, &yerr) {
			pos := Pos{File: p.file, Line: 1, Col: 1}
			if tk := yerr.GetToken(); tk != nil && tk.Position != nil {
				pos.Line, pos.Col = tk.Position.Line, tk.Position.Column
			}
			p.errorf(pos, "invalid YAML: %s", yerr.GetMessage())
		} else {
			p.errorf(Pos{File: p.file, Line: 1, Col: 1}, "invalid YAML: %v", err)
		}
		return nil, false
	}
	return f, true
}

// document checks the limits of data (see prepare), parses it and returns the body of its single YAML document (nil when
// the file holds none). what names the file kind in the error for a second document.
// ok is false when the YAML does not parse (the error is recorded).
func (p *fileParser) document(data []byte, what string) (body ast.Node, ok bool) {
	if data, ok = p.prepare(data); !ok {
		return nil, false
	}
	f, ok := p.parseYAML(data)
	if !ok {
		return nil, false
	}
	for _, doc := range f.Docs {
		if doc == nil || doc.Body == nil {
			continue
		}
		if body != nil {
			p.errorf(p.pos(doc.Body), "%s holds one YAML document; remove the extra document", what)
			break
		}
		body = doc.Body
	}
	return body, true
}

// definedName reads the required "name" of a rule or test (kind) at pos
// from m, reports a missing, malformed or duplicate name, and records a new one in
// names. It returns the name and whether it is valid.
func (p *fileParser) definedName(m map[string]*ast.MappingValueNode, kind string, pos Pos, names map[string]Pos) (string, bool) {
	v, ok := m["name"]
	if !ok {
		p.errorf(pos, "%s is missing its name", kind)
		return "", false
	}
	name, ok := p.name(v.Value, kind+" name")
	if !ok {
		return "", false
	}
	if first, dup := names[name]; dup {
		p.errorf(p.pos(v.Value), "duplicate %s %q (first defined at %s)", kind, name, first)
		return "", false
	}
	names[name] = pos
	return name, true
}

func (p *fileParser) parseFile(data []byte) *Policy {
	body, ok := p.document(data, "a policy file")
	if !ok {
		return nil
	}
	pol := &Policy{File: p.file}
	if body == nil {
		p.errorf(Pos{File: p.file, Line: 1, Col: 1}, `missing "version: 1" (an empty policy is a file holding only "version: 1")`)
		return nil
	}
	top, ok := p.mapping(body, "policy", []string{"version", "segments", "rules", "tests", "relays"})
	if !ok {
		return nil
	}
	if v, ok := top["version"]; !ok {
		p.errorf(p.pos(body), `missing "version: 1"`)
	} else if n := p.value(v.Value); n != nil {
		in, isInt := n.(*ast.IntegerNode)
		switch {
		case !isInt:
			p.errorf(p.pos(n), "version must be an integer, got %s", yamlpos.Kind(n))
		case in.GetToken().Value != "1":
			// Only the literal 1: 0x1, 01 and +1 are the same integer to YAML but
			// not what a reader of the file expects to see.
			p.errorf(p.pos(n), "unsupported version %s; want 1", in.GetToken().Value)
		default:
			pol.Version = 1
		}
	}
	segs := map[string]*Segment{}
	if v, ok := top["segments"]; ok {
		items, _ := p.list(v.Value, "segments")
		for _, item := range items {
			if s := p.parseSegment(item, segs); s != nil {
				pol.Segments = append(pol.Segments, *s)
			}
		}
	}
	if v, ok := top["rules"]; ok {
		names := map[string]Pos{}
		items, _ := p.list(v.Value, "rules")
		for _, item := range items {
			if r := p.parseRule(item, segs, names); r != nil {
				pol.Rules = append(pol.Rules, *r)
			}
		}
	}
	if v, ok := top["tests"]; ok {
		names := map[string]Pos{}
		items, _ := p.list(v.Value, "tests")
		for _, item := range items {
			if t := p.parseTest(item, names); t != nil {
				pol.Tests = append(pol.Tests, *t)
			}
		}
	}
	if v, ok := top["relays"]; ok {
		seen := map[string]Pos{}
		items, _ := p.list(v.Value, "relays")
		for _, item := range items {
			if r := p.parseRelay(item, segs, seen); r != nil {
				pol.Relays = append(pol.Relays, *r)
			}
		}
	}
	return pol
}

// value unwraps n, reporting YAML features the policy format does not accept.
// It returns nil after reporting.
func (p *fileParser) value(n ast.Node) ast.Node {
	switch n.(type) {
	case *ast.AnchorNode, *ast.AliasNode:
		p.errorf(p.pos(n), "YAML anchors and aliases are not supported in policy files; write the value out")
		return nil
	case *ast.TagNode:
		p.errorf(p.pos(n), "YAML tags are not supported in policy files; remove %s", n.GetToken().Value)
		return nil
	}
	return n
}

// mapping returns the entries of a YAML mapping by key. It reports a value that
// is not a mapping, keys that are not plain strings and keys outside known (with
// a hint when one is close); known == nil accepts every key.
func (p *fileParser) mapping(n ast.Node, what string, known []string) (map[string]*ast.MappingValueNode, bool) {
	if n = p.value(n); n == nil {
		return nil, false
	}
	var values []*ast.MappingValueNode
	switch v := n.(type) {
	case *ast.MappingNode:
		values = v.Values
	case *ast.MappingValueNode:
		values = []*ast.MappingValueNode{v}
	default:
		p.errorf(p.pos(n), "%s must be a mapping, got %s", what, yamlpos.Kind(n))
		return nil, false
	}
	out := make(map[string]*ast.MappingValueNode, len(values))
	for _, mv := range values {
		key, ok := p.key(mv.Key, what)
		if !ok {
			continue
		}
		if known != nil && !slices.Contains(known, key) {
			msg := fmt.Sprintf("unknown field %q in %s", key, what)
			if c := closest(key, known); c != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", c)
			}
			p.errorf(p.pos(mv.Key), "%s", msg)
			continue
		}
		out[key] = mv
	}
	return out, true
}

// key returns a mapping key's text; keys must be scalars.
func (p *fileParser) key(k ast.MapKeyNode, what string) (string, bool) {
	switch v := k.(type) {
	case *ast.StringNode:
		return v.Value, true
	case *ast.IntegerNode, *ast.FloatNode, *ast.BoolNode:
		return v.GetToken().Value, true
	case *ast.MergeKeyNode:
		p.errorf(p.pos(k), "YAML merge keys are not supported in policy files")
		return "", false
	}
	p.errorf(p.pos(k), "keys in %s must be plain strings", what)
	return "", false
}

// list returns the items of a YAML sequence; null counts as an empty list. It
// returns false after reporting a value that is not a list.
func (p *fileParser) list(n ast.Node, what string) ([]ast.Node, bool) {
	if n = p.value(n); n == nil {
		return nil, false
	}
	switch v := n.(type) {
	case *ast.SequenceNode:
		return v.Values, true
	case *ast.NullNode:
		return nil, true
	}
	p.errorf(p.pos(n), "%s must be a list, got %s", what, yamlpos.Kind(n))
	return nil, false
}

// nonEmptyList is list for fields that, when present, must hold at least one item.
func (p *fileParser) nonEmptyList(n ast.Node, what, hint string) ([]ast.Node, bool) {
	items, ok := p.list(n, what)
	if ok && len(items) == 0 {
		p.errorf(p.pos(n), "%s is empty; %s", what, hint)
		return nil, false
	}
	return items, ok
}

// str returns a string scalar.
func (p *fileParser) str(n ast.Node, what string) (string, bool) {
	if n = p.value(n); n == nil {
		return "", false
	}
	switch v := n.(type) {
	case *ast.StringNode:
		return v.Value, true
	case *ast.LiteralNode: // a block scalar (| or >)
		return v.Value.Value, true
	case *ast.IntegerNode, *ast.FloatNode, *ast.BoolNode:
		p.errorf(p.pos(n), "%s must be a string, got %s (quote it: %q)", what, yamlpos.Kind(n), v.GetToken().Value)
		return "", false
	}
	if text, ok := unquotedIPv6(n); ok {
		p.errorf(p.pos(n), "%s must be a string, got a mapping: YAML reads an unquoted IPv6 address or CIDR in a flow list as KEY: VALUE; quote it: %q", what, text)
		return "", false
	}
	p.errorf(p.pos(n), "%s must be a string, got %s", what, yamlpos.Kind(n))
	return "", false
}

// unquotedIPv6 reports whether n is a mapping of one entry that YAML made of an
// unquoted IPv6 address or CIDR in a flow list ([2001:db8::/32] reads as
// [{2001: "db8::/32"}]), and returns the text as written.
func unquotedIPv6(n ast.Node) (string, bool) {
	var mv *ast.MappingValueNode
	switch v := n.(type) {
	case *ast.MappingValueNode:
		mv = v
	case *ast.MappingNode:
		if len(v.Values) != 1 {
			return "", false
		}
		mv = v.Values[0]
	default:
		return "", false
	}
	k, v := mv.Key.GetToken(), mv.Value.GetToken()
	if k == nil || v == nil {
		return "", false
	}
	text := k.Value + ":" + v.Value
	if a, err := netip.ParseAddr(text); err == nil && a.Is6() {
		return text, true
	}
	if pfx, err := netip.ParsePrefix(text); err == nil && pfx.Addr().Is6() {
		return text, true
	}
	return "", false
}

// name returns a valid segment or rule name.
func (p *fileParser) name(n ast.Node, what string) (string, bool) {
	s, ok := p.str(n, what)
	if !ok {
		return "", false
	}
	if !nameRE.MatchString(s) {
		p.errorf(p.pos(n), "invalid %s %q: must match %s", what, s, nameSyntax)
		return "", false
	}
	return s, true
}

// nodeName returns a valid node name (ValidNodeName).
func (p *fileParser) nodeName(n ast.Node) (string, bool) {
	s, ok := p.str(n, "node name")
	if ok && !ValidNodeName(s) {
		p.errorf(p.pos(n), "invalid node name %q: must match %s", s, NodeNameSyntax)
		return "", false
	}
	return s, ok
}

func (p *fileParser) parseSegment(n ast.Node, defined map[string]*Segment) *Segment {
	m, ok := p.mapping(n, "segment", []string{"name", "selectors", "nodes", "cidrs"})
	if !ok {
		return nil
	}
	seg := &Segment{Pos: p.pos(n)}
	valid := true
	if v, ok := m["name"]; !ok {
		p.errorf(seg.Pos, "segment is missing its name")
		valid = false
	} else if name, ok := p.name(v.Value, "segment name"); !ok {
		valid = false
	} else if name == AllSegment {
		p.errorf(p.pos(v.Value), "segment name %q is reserved for the built-in segment of every node", name)
		valid = false
	} else if first, dup := defined[name]; dup {
		p.errorf(p.pos(v.Value), "duplicate segment %q (first defined at %s)", name, first.Pos)
	} else {
		seg.Name = name
		defined[name] = seg
	}
	_, hasSel := m["selectors"]
	_, hasNodes := m["nodes"]
	if v, ok := m["selectors"]; ok {
		items, ok := p.nonEmptyList(v.Value, "selectors", "list at least one selector or remove the field")
		valid = valid && ok
		for _, item := range items {
			sel, ok := p.parseSelector(item)
			if !ok {
				valid = false
				continue
			}
			seg.Selectors = append(seg.Selectors, sel)
		}
	}
	if v, ok := m["nodes"]; ok {
		items, ok := p.nonEmptyList(v.Value, "nodes", "list at least one node name or remove the field")
		valid = valid && ok
		for _, item := range items {
			s, ok := p.nodeName(item)
			if !ok {
				valid = false
				continue
			}
			seg.Nodes = append(seg.Nodes, s)
			seg.NodesPos = append(seg.NodesPos, p.pos(item))
		}
	}
	if v, ok := m["cidrs"]; ok {
		if hasSel || hasNodes {
			p.errorf(p.pos(v.Key), "a segment holds either nodes (selectors, nodes) or external addresses (cidrs), not both")
			valid = false
		}
		items, ok := p.nonEmptyList(v.Value, "cidrs", "list at least one CIDR or remove the field")
		valid = valid && ok
		for _, item := range items {
			c, ok := p.parseCIDR(item)
			if !ok {
				valid = false
				continue
			}
			seg.CIDRs = append(seg.CIDRs, c)
		}
	}
	if !hasSel && !hasNodes && m["cidrs"] == nil {
		p.errorf(seg.Pos, "segment selects nothing; give it selectors, nodes or cidrs")
		valid = false
	}
	if !valid || seg.Name == "" {
		return nil
	}
	return seg
}

func (p *fileParser) parseSelector(n ast.Node) (Selector, bool) {
	m, ok := p.mapping(n, "selector", nil)
	if !ok {
		return nil, false
	}
	if len(m) == 0 {
		p.errorf(p.pos(n), "empty selector; list at least one label (the built-in segment %q holds every node)", AllSegment)
		return nil, false
	}
	sel := make(Selector, len(m))
	valid := true
	for k, mv := range m {
		v, ok := p.label(k, mv)
		if !ok {
			valid = false
			continue
		}
		sel[k] = v
	}
	return sel, valid
}

// label checks one label of a selector or an inventory node, key k of entry mv,
// against the label syntax (CheckLabelKey, CheckLabelValue), reporting each
// problem at the key or the value. It returns the value.
func (p *fileParser) label(k string, mv *ast.MappingValueNode) (string, bool) {
	valid := true
	if err := CheckLabelKey(k); err != nil {
		p.errorf(p.pos(mv.Key), "%v", err)
		valid = false
	}
	v, ok := p.str(mv.Value, fmt.Sprintf("value of label %q", k))
	if !ok {
		return "", false
	}
	if err := CheckLabelValue(k, v); err != nil {
		p.errorf(p.pos(mv.Value), "%v", err)
		valid = false
	}
	return v, valid
}

// parsePrefix parses a masked CIDR prefix, hinting the canonical form.
func (p *fileParser) parsePrefix(n ast.Node, what string) (netip.Prefix, bool) {
	s, ok := p.str(n, what)
	if !ok {
		return netip.Prefix{}, false
	}
	pfx, err := parsePrefixText(s, what)
	if err != nil {
		p.errorf(p.pos(n), "%v", err)
		return netip.Prefix{}, false
	}
	return pfx, true
}

// parsePrefixText parses ADDRESS/BITS as netip.ParsePrefix does, refusing
// IPv4-mapped IPv6 prefixes and prefixes with host bits set; the error names the
// field (what) and hints the canonical or intended form.
func parsePrefixText(s, what string) (netip.Prefix, error) {
	pfx, err := netip.ParsePrefix(s)
	if err != nil {
		if a, aerr := netip.ParseAddr(s); aerr == nil && a.Zone() == "" {
			a = a.Unmap() // an IPv4-mapped address means its IPv4 address
			return netip.Prefix{}, fmt.Errorf("%s %q is an address, not a CIDR (did you mean %s?)", what, s, netip.PrefixFrom(a, a.BitLen()))
		}
		return netip.Prefix{}, fmt.Errorf("invalid %s %q: want ADDRESS/BITS, e.g. 192.0.2.0/24", what, s)
	}
	if pfx.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("%s %q is an IPv4-mapped IPv6 prefix; write it as an IPv4 CIDR", what, s)
	}
	if m := pfx.Masked(); m != pfx {
		return netip.Prefix{}, fmt.Errorf("%s %s has host bits set (did you mean %s?)", what, pfx, m)
	}
	return pfx, nil
}

func (p *fileParser) parseCIDR(n ast.Node) (CIDR, bool) {
	switch v := p.value(n); v.(type) {
	case nil:
		return CIDR{}, false
	case *ast.MappingNode, *ast.MappingValueNode:
		if _, ok := unquotedIPv6(v); ok {
			pfx, ok := p.parsePrefix(v, "cidr") // reports the hint
			return CIDR{Prefix: pfx, Pos: p.pos(v)}, ok
		}
	default:
		pfx, ok := p.parsePrefix(v, "cidr")
		return CIDR{Prefix: pfx, Pos: p.pos(v)}, ok
	}
	m, ok := p.mapping(n, "cidrs entry", []string{"cidr", "except"})
	if !ok {
		return CIDR{}, false
	}
	v, ok := m["cidr"]
	if !ok {
		p.errorf(p.pos(n), "cidrs entry is missing its cidr")
		return CIDR{}, false
	}
	pfx, pfxOK := p.parsePrefix(v.Value, "cidr")
	valid := pfxOK
	c := CIDR{Prefix: pfx, Pos: p.pos(v.Value)}
	if ev, ok := m["except"]; ok {
		items, ok := p.nonEmptyList(ev.Value, "except", "list at least one CIDR or remove the field")
		valid = valid && ok
		for _, item := range items {
			e, ok := p.parsePrefix(item, "except")
			if !ok {
				valid = false
				continue
			}
			if pfxOK && !(e.Addr().BitLen() == pfx.Addr().BitLen() && e.Bits() > pfx.Bits() && pfx.Contains(e.Addr())) {
				p.errorf(p.pos(item), "except %s does not lie strictly inside %s", e, pfx)
				valid = false
				continue
			}
			c.Except = append(c.Except, e)
		}
		if valid && len(cidrPrefixes([]CIDR{c})) == 0 {
			p.errorf(p.pos(v.Value), "the except entries cover all of %s; the entry selects nothing", pfx)
			valid = false
		}
	}
	return c, valid
}

func (p *fileParser) parseRule(n ast.Node, segs map[string]*Segment, names map[string]Pos) *Rule {
	m, ok := p.mapping(n, "rule", []string{"name", "from", "to", "ports"})
	if !ok {
		return nil
	}
	r := &Rule{Pos: p.pos(n)}
	var valid bool
	r.Name, valid = p.definedName(m, "rule", r.Pos, names)
	var fromExternal, toExternal bool
	var fromOK, toOK bool
	r.From, fromExternal, fromOK = p.parseRefs(n, m, "from", segs)
	r.To, toExternal, toOK = p.parseRefs(n, m, "to", segs)
	if v, ok := m["from"]; ok {
		r.FromPos = p.pos(v.Key)
	}
	if v, ok := m["to"]; ok {
		r.ToPos = p.pos(v.Key)
	}
	valid = valid && fromOK && toOK
	if valid && fromExternal && toExternal {
		p.errorf(r.Pos, "rule %q connects no node: from and to are both external (cidrs) segments", r.Name)
		valid = false
	}
	if valid {
		if n, only := soleNode(r.From, segs); only {
			if m, only := soleNode(r.To, segs); only && m == n {
				p.errorf(r.Pos, "rule %q matches no packet: from and to hold only node %q, and a node's traffic to itself does not cross the overlay", r.Name, n)
				valid = false
			}
		}
	}
	if v, ok := m["ports"]; !ok {
		p.errorf(r.Pos, "rule is missing its ports (e.g. ports: [tcp/443])")
		valid = false
	} else {
		items, ok := p.nonEmptyList(v.Value, "ports", "list at least one port such as tcp/443, icmp or any")
		valid = valid && ok
		for _, item := range items {
			pm, ok := p.parsePortEntry(item)
			if !ok {
				valid = false
				continue
			}
			r.Ports = append(r.Ports, pm)
		}
	}
	if !valid {
		return nil
	}
	return r
}

// soleNode reports whether the segments refs hold at most one node, named
// explicitly, and returns its name: they are node segments without selectors
// whose node lists name the same single node.
func soleNode(refs []string, segs map[string]*Segment) (string, bool) {
	var name string
	for _, ref := range refs {
		s := segs[ref]
		if s == nil || s.External() || len(s.Selectors) > 0 {
			return "", false
		}
		for _, n := range s.Nodes {
			if name != "" && n != name {
				return "", false
			}
			name = n
		}
	}
	return name, name != ""
}

// parseRefs parses the from or to list of a rule. external reports whether every
// referenced segment is an external (cidrs) segment.
func (p *fileParser) parseRefs(rule ast.Node, m map[string]*ast.MappingValueNode, field string, segs map[string]*Segment) (refs []string, external, ok bool) {
	v, present := m[field]
	if !present {
		p.errorf(p.pos(rule), "rule is missing %s (a list of segment names)", field)
		return nil, false, false
	}
	items, ok := p.nonEmptyList(v.Value, field, "list at least one segment")
	if !ok {
		return nil, false, false
	}
	sr, ok := p.segmentRefs(items, field, segs)
	external = true
	for _, r := range sr {
		external = external && r.seg != nil && r.seg.External()
		refs = append(refs, r.name)
	}
	return refs, external, ok
}

// segRef is one resolved segment reference of a list: the name, the segment
// (nil for "all") and where the name is written.
type segRef struct {
	name string
	seg  *Segment
	node ast.Node
}

// segmentRefs resolves the items of a list of segment references (the from or
// to of a rule, the for of a relay: field) against the defined segments segs.
// It reports an item that is not a string, an undefined segment (with the
// closest defined name as a hint) and "all" combined with other segments, and
// returns the references it resolved, in list order, with ok false when it
// reported a problem.
func (p *fileParser) segmentRefs(items []ast.Node, field string, segs map[string]*Segment) (refs []segRef, ok bool) {
	ok = true
	var allPos *Pos
	for _, item := range items {
		name, good := p.str(item, "segment reference")
		if !good {
			ok = false
			continue
		}
		s, def := segs[name]
		switch {
		case name == AllSegment:
			pos := p.pos(item)
			allPos = &pos
		case !def:
			msg := fmt.Sprintf("undefined segment %q", name)
			cands := make([]string, 0, len(segs)+1)
			for k := range segs {
				cands = append(cands, k)
			}
			cands = append(cands, AllSegment)
			if c := closest(name, cands); c != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", c)
			}
			p.errorf(p.pos(item), "%s", msg)
			ok = false
			continue
		}
		refs = append(refs, segRef{name: name, seg: s, node: item})
	}
	if allPos != nil && len(items) > 1 {
		p.errorf(*allPos, "%q already holds every node; do not combine it with other segments in %s", AllSegment, field)
		ok = false
	}
	return refs, ok
}

// parseRelay parses one entry of the relays section; seen maps the relay nodes
// parsed so far to their entries' positions.
func (p *fileParser) parseRelay(n ast.Node, segs map[string]*Segment, seen map[string]Pos) *Relay {
	m, ok := p.mapping(n, "relay", []string{"node", "for"})
	if !ok {
		return nil
	}
	r := &Relay{Pos: p.pos(n)}
	valid := true
	if v, ok := m["node"]; !ok {
		p.errorf(r.Pos, "relay is missing its node (the name of the relay node)")
		valid = false
	} else if name, ok := p.nodeName(v.Value); !ok {
		valid = false
	} else if first, dup := seen[name]; dup {
		p.errorf(p.pos(v.Value), "duplicate relay %q (first defined at %s); list its segments in one for", name, first)
		valid = false
	} else {
		r.Node = name
		seen[name] = r.Pos
	}
	v, ok := m["for"]
	if !ok {
		p.errorf(r.Pos, "relay is missing for (a list of the segments whose nodes may use it)")
		return nil
	}
	items, ok := p.nonEmptyList(v.Value, "for", "list at least one segment whose nodes may use the relay")
	if !ok {
		return nil
	}
	refs, ok := p.segmentRefs(items, "for", segs)
	valid = valid && ok
	for _, ref := range refs {
		if ref.seg != nil && ref.seg.External() {
			p.errorf(p.pos(ref.node), "segment %q holds external addresses (cidrs); a relay forwards only between nodes, so for lists node segments or %q", ref.name, AllSegment)
			valid = false
			continue
		}
		r.For = append(r.For, ref.name)
	}
	if valid {
		if only, ok := soleNode(r.For, segs); ok {
			p.errorf(p.pos(v.Key), "relay %q forwards for no pair: its for holds only node %q, and a relay forwards between two nodes other than itself", r.Node, only)
			valid = false
		}
	}
	if !valid {
		return nil
	}
	return r
}

func (p *fileParser) parsePortEntry(n ast.Node) (PortMatch, bool) {
	if n = p.value(n); n == nil {
		return PortMatch{}, false
	}
	switch v := n.(type) {
	case *ast.StringNode, *ast.LiteralNode:
		text, _ := p.str(v, "port")
		pm, err := parsePort(text)
		if err != nil {
			p.errorf(p.pos(n), "%v", err)
			return PortMatch{}, false
		}
		return pm, true
	case *ast.IntegerNode:
		s := v.GetToken().Value
		p.errorf(p.pos(n), "port %s has no protocol; did you mean tcp/%s or udp/%s?", s, s, s)
		return PortMatch{}, false
	}
	p.errorf(p.pos(n), "port must be a string such as tcp/443, got %s", yamlpos.Kind(n))
	return PortMatch{}, false
}

// closest returns the candidate nearest to s by optimal-string-alignment edit
// distance (Damerau-Levenshtein with adjacent transpositions), if it is at most
// 1 for names of up to 3 characters and 2 otherwise; ties go to the smallest name.
func closest(s string, cands []string) string {
	limit := 2
	if len(s) <= 3 {
		limit = 1
	}
	best, bestD := "", limit+1
	for _, c := range cands {
		if c == s {
			continue
		}
		if d := editDistance(s, c); d < bestD || d == bestD && c < best {
			best, bestD = c, d
		}
	}
	if bestD > limit {
		return ""
	}
	return best
}

func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return 1 << 20 // not worth a hint; keeps the cost bounded
	}
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}

func (p *fileParser) parseTest(n ast.Node, names map[string]Pos) *Test {
	m, ok := p.mapping(n, "test", []string{"name", "from", "to", "allow", "deny", "only"})
	if !ok {
		return nil
	}
	t := &Test{Pos: p.pos(n)}
	var valid bool
	t.Name, valid = p.definedName(m, "test", t.Pos, names)
	if v, ok := m["from"]; !ok {
		p.errorf(t.Pos, "test is missing from (a segment, node or address)")
		valid = false
	} else if e, ok := p.testEndpoint(v.Value, "from"); ok {
		t.From = e
	} else {
		valid = false
	}
	_, hasTo := m["to"]
	_, hasOnly := m["only"]
	_, hasAllow := m["allow"]
	_, hasDeny := m["deny"]
	switch {
	case hasOnly && (hasTo || hasAllow || hasDeny):
		for _, k := range []string{"to", "allow", "deny"} {
			if v, ok := m[k]; ok {
				p.errorf(p.pos(v.Key), "a test with only takes no %s: an only test lists every target from may reach, on any port; write a separate test for %s", k, k)
			}
		}
		valid = false
	case hasOnly:
		v := m["only"]
		if _, isNull := p.value(v.Value).(*ast.NullNode); isNull {
			p.errorf(p.pos(v.Value), "only needs a list of targets; write only: [] to assert that from reaches nothing")
			valid = false
			break
		}
		items, ok := p.list(v.Value, "only")
		valid = valid && ok
		t.Only = []Endpoint{}
		for _, item := range items {
			e, ok := p.testEndpoint(item, "only target")
			if !ok {
				valid = false
				continue
			}
			if e.Name == AllSegment && len(items) > 1 {
				p.errorf(p.pos(item), "%q already holds every node; do not combine it with other targets in only", AllSegment)
				valid = false
				continue
			}
			t.Only = append(t.Only, e)
		}
	case !hasTo:
		p.errorf(t.Pos, "test needs to (with allow and/or deny) or only")
		valid = false
	default:
		if e, ok := p.testEndpoint(m["to"].Value, "to"); ok {
			t.To = e
		} else {
			valid = false
		}
		if !hasAllow && !hasDeny {
			p.errorf(t.Pos, "test needs allow or deny (lists of ports such as tcp/443, icmp or any)")
			valid = false
		}
		var allowed PortSet
		for _, k := range []string{"allow", "deny"} {
			v, ok := m[k]
			if !ok {
				continue
			}
			items, ok := p.nonEmptyList(v.Value, k, "list at least one port such as tcp/443, icmp or any, or remove the field")
			valid = valid && ok
			for _, item := range items {
				pm, ok := p.parsePortEntry(item)
				if !ok {
					valid = false
					continue
				}
				ps := portSetOfMatch(pm)
				if k == "allow" {
					t.Allow = append(t.Allow, pm)
					allowed = allowed.Union(ps)
				} else {
					if both := allowed.Intersect(ps); !both.Empty() {
						p.errorf(p.pos(item), "%s is both in allow and in deny", both)
						valid = false
						continue
					}
					t.Deny = append(t.Deny, pm)
				}
			}
		}
	}
	if !valid {
		return nil
	}
	return t
}

// testEndpoint parses a test's from, to or only target: a segment or node name
// or an address, without a port.
func (p *fileParser) testEndpoint(n ast.Node, what string) (Endpoint, bool) {
	if seq, ok := n.(*ast.SequenceNode); ok && len(seq.Values) == 1 {
		if sn, ok := seq.Values[0].(*ast.StringNode); ok {
			if a, err := netip.ParseAddr(sn.Value); err == nil && a.Is6() {
				p.errorf(p.pos(n), "%s must be a string, got a list; quote a bracketed IPv6 address: \"[%s]\"", what, sn.Value)
				return Endpoint{}, false
			}
		}
	}
	s, ok := p.str(n, what)
	if !ok {
		return Endpoint{}, false
	}
	e, err := ParseEndpoint(s)
	if err != nil {
		p.errorf(p.pos(n), "%s: %v", what, err)
		return Endpoint{}, false
	}
	if e.Port != 0 {
		e.Port = 0
		p.errorf(p.pos(n), "%s %q has a port; a test lists ports in allow and deny: write %s and allow: [tcp/%s] (or udp)", what, s, e, s[strings.LastIndexByte(s, ':')+1:])
		return Endpoint{}, false
	}
	return e, true
}
