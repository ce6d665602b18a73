package netmap

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"pgregory.net/rapid"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/store"
	"segmesh/policy"
)

// engineModel drives an Engine and the from-scratch computation side by side.
type engineModel struct {
	t      *rapid.T
	cfg    Config
	rev    uint64
	pol    *policy.Policy // nil: default deny
	nodes  map[string]store.Node
	engine *Engine
	ref    map[string]*segmeshv1.Netmap // FromCompiled after the last step
	held   map[string]*segmeshv1.Netmap // what an agent holds after applying the updates
}

var (
	modelNames  = []string{"n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"}
	modelRoles  = []string{"web", "db", "ops"}
	modelEnvs   = []string{"prod", "dev"}
	modelSegs   = []string{"all", "web", "db", "ops", "prod", "pinned", "ext"}
	modelPorts  = []string{"tcp/5432", "tcp/80-90", "udp/53", "any", "icmp"}
	modelPolicy = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
  - name: ops
    selectors: [{role: ops}, {env: dev}]
  - name: prod
    selectors: [{env: prod}]
  - name: pinned
    nodes: [n1, n3, n6]
  - name: ext
    cidrs: [10.0.0.0/8]
`
)

func (m *engineModel) drawNode(name string, i int) store.Node {
	t := m.t
	n := store.Node{
		Name:      name,
		Labels:    map[string]string{"role": rapid.SampledFrom(modelRoles).Draw(t, "role"), "env": rapid.SampledFrom(modelEnvs).Draw(t, "env")},
		Addresses: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)}), netip.AddrFrom16([16]byte{0xfd, 0x5e, 15: byte(i + 1)})},
		PublicKey: []byte{byte(i), rapid.Byte().Draw(t, "key"), 31: 1},
		Endpoint:  rapid.SampledFrom([]string{"", "192.0.2.1:51820", "192.0.2.2:51820"}).Draw(t, "endpoint"),
	}
	if rapid.Bool().Draw(t, "identity") {
		n.IdentityKey = []byte{0x30, byte(i)}
	}
	n.Candidates = drawCandidates(t)
	return n
}

// drawCandidates draws a node's stored candidates: none, or some of a few.
func drawCandidates(t *rapid.T) []store.Candidate {
	all := []store.Candidate{{Endpoint: "10.0.0.1:51820", Kind: "local"}, {Endpoint: "192.0.2.1:51820", Kind: "observed"}, {Endpoint: "203.0.113.9:4000", Kind: "stun"}}
	return rapid.SliceOfNDistinct(rapid.SampledFrom(all), 0, len(all), func(c store.Candidate) string { return c.Endpoint }).Draw(t, "candidates")
}

func (m *engineModel) drawPolicy() *policy.Policy {
	t := m.t
	var b strings.Builder
	b.WriteString(modelPolicy)
	b.WriteString("rules:\n")
	for i := range rapid.IntRange(0, 4).Draw(t, "rules") {
		from := rapid.SliceOfNDistinct(rapid.SampledFrom(modelSegs), 1, 2, rapid.ID[string]).Draw(t, "from")
		to := rapid.SliceOfNDistinct(rapid.SampledFrom(modelSegs), 1, 2, rapid.ID[string]).Draw(t, "to")
		to = slices.DeleteFunc(to, func(s string) bool { return s == "ext" && slices.Contains(from, "ext") })
		if len(to) == 0 {
			to = []string{"web"}
		}
		fmt.Fprintf(&b, "  - name: r%d\n    from: [%s]\n    to: [%s]\n    ports: [%s]\n", i, strings.Join(from, ", "), strings.Join(to, ", "),
			rapid.SampledFrom(modelPorts).Draw(t, "ports"))
	}
	p, err := policy.Parse("p.yaml", []byte(b.String()))
	if err != nil {
		t.Skipf("drawn policy does not parse (%v):\n%s", err, b.String())
	}
	return p
}

func (m *engineModel) sortedNodes() []store.Node {
	return slices.SortedFunc(maps.Values(m.nodes), func(a, b store.Node) int { return strings.Compare(a.Name, b.Name) })
}

// check compares every netmap of the Engine with the from-scratch computation,
// applies updates to the netmaps an agent holds and checks they arrive at the
// same netmaps, and that exactly the changed netmaps had an update.
func (m *engineModel) check(step string, updates []Update) {
	t := m.t
	nodes := m.sortedNodes()
	var compiled *policy.Compiled
	if m.pol != nil {
		var err error
		if compiled, err = policy.Compile(m.pol, Inventory(nodes)); err != nil {
			t.Fatalf("%s: compile: %v", step, err)
		}
	}
	prev := m.ref
	m.ref = FromCompiled(m.cfg, m.rev, compiled, nodes, func(n string) *segmeshv1.Netmap { return prev[n] })
	updated := map[string]Update{}
	for _, u := range updates {
		if _, dup := updated[u.Node]; dup {
			t.Fatalf("%s: two updates for %s", step, u.Node)
		}
		updated[u.Node] = u
	}
	for name, old := range prev {
		want := m.ref[name]
		_, got := updated[name]
		if changed := want == nil || want.GetHash() != old.GetHash(); changed != got {
			t.Fatalf("%s: netmap of %s changed=%v but update=%v", step, name, changed, got)
		}
		if u, ok := updated[name]; ok && want != nil {
			lost := old.GetGossip() != nil && want.GetGossip() == nil && !want.GetRevoked()
			if u.LostGossip != lost {
				t.Fatalf("%s: %s LostGossip = %v, want %v", step, name, u.LostGossip, lost)
			}
		}
	}
	if got, want := m.engine.Nodes(), slices.Sorted(maps.Keys(m.ref)); !slices.Equal(got, want) {
		t.Fatalf("%s: engine nodes %v, want %v", step, got, want)
	}
	for name, want := range m.ref {
		got, version, ok := m.engine.Netmap(name)
		if !ok {
			t.Fatalf("%s: engine has no netmap for %s", step, name)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("%s: netmap of %s:\n engine %v\n  want  %v", step, name, got, want)
		}
		if h := wire.NetmapHashV2(got); h != got.GetHash() {
			t.Fatalf("%s: %s hash %s, content hashes to %s", step, name, got.GetHash(), h)
		}
		u, ok := updated[name]
		switch {
		case !ok && prev[name] == nil && updates == nil:
			m.held[name] = got // the start
			continue
		case !ok && prev[name] == nil:
			t.Fatalf("%s: new node %s had no update", step, name)
		case !ok:
			continue
		case u.Version != version || u.Hash != got.GetHash() || u.Revision != got.GetPolicyRevision():
			t.Fatalf("%s: %s update version %d hash %.8s rev %d, netmap version %d hash %.8s rev %d", step, name, u.Version, u.Hash, u.Revision, version, got.GetHash(), got.GetPolicyRevision())
		case u.Delta == nil:
			m.held[name] = got
			continue
		}
		applied, err := wire.ApplyDelta(m.held[name], u.Delta)
		if err != nil {
			t.Fatalf("%s: applying the delta for %s: %v\ndelta %v", step, name, err, u.Delta)
		}
		if !proto.Equal(applied, got) {
			t.Fatalf("%s: delta for %s gives\n%v\nwant\n%v", step, name, applied, got)
		}
		m.held[name] = applied
	}
	for name := range prev {
		if _, ok := m.ref[name]; !ok {
			if u := updated[name]; !u.Removed {
				t.Fatalf("%s: deleted node %s had no Removed update", step, name)
			}
			delete(m.held, name)
		}
	}
}

// TestEngineMatchesFromScratch runs random sequences of enrollments, relabels,
// revocations, deletions, endpoint and key changes, policy changes and gossip key
// rotations, and checks after each that the Engine's netmaps equal FromCompiled's
// and that its deltas take an agent from each netmap to the next.
func TestEngineMatchesFromScratch(t *testing.T) { testEngineMatchesFromScratch(t, false) }

// TestEngineMatchesFromScratchWithRotation is TestEngineMatchesFromScratch with
// the gossip key rotated, and its updates merged (MergeUpdates), after every
// change that makes a node lose the key, as the controller publishes them.
func TestEngineMatchesFromScratchWithRotation(t *testing.T) { testEngineMatchesFromScratch(t, true) }

func testEngineMatchesFromScratch(t *testing.T, mergeRotation bool) {
	rapid.Check(t, func(t *rapid.T) {
		m := &engineModel{t: t, nodes: map[string]store.Node{}, held: map[string]*segmeshv1.Netmap{},
			cfg: Config{GossipKey: []byte("k0"), GossipPort: 7946, OverlayPrefixes: []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10")}}}
		for i, name := range modelNames {
			if rapid.Bool().Draw(t, "initial "+name) {
				m.nodes[name] = m.drawNode(name, i)
			}
		}
		if rapid.Bool().Draw(t, "initial policy") {
			m.rev, m.pol = 1, m.drawPolicy()
		}
		var prog *policy.Program
		if m.pol != nil {
			prog, _ = policy.Prepare(m.pol)
		}
		m.engine = NewEngine(m.cfg, m.rev, prog, m.sortedNodes())
		m.ref = map[string]*segmeshv1.Netmap{}
		m.check("start", nil)
		for step := range rapid.IntRange(1, 30).Draw(t, "steps") {
			name := rapid.SampledFrom(modelNames).Draw(t, "node")
			i := slices.Index(modelNames, name)
			n, exists := m.nodes[name]
			var updates []Update
			op := rapid.SampledFrom([]string{"enroll", "relabel", "revoke", "delete", "endpoint", "address", "key", "rotation", "policy", "deny", "gossip", "identity", "noaddr", "empty", "candidates"}).Draw(t, "op")
			label := fmt.Sprintf("step %d: %s %s", step, op, name)
			switch {
			case op == "enroll" && !exists:
				n = m.drawNode(name, i)
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "relabel" && exists:
				n.Labels = map[string]string{"role": rapid.SampledFrom(modelRoles).Draw(t, "role"), "env": rapid.SampledFrom(modelEnvs).Draw(t, "env")}
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "revoke" && exists:
				n.RevokedAt = time.Unix(1, 0)
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "delete" && exists:
				delete(m.nodes, name)
				updates = m.engine.Remove(name)
			case op == "endpoint" && exists:
				n.Endpoint = rapid.SampledFrom([]string{"", "192.0.2.1:51820", "198.51.100.7:4000"}).Draw(t, "endpoint")
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "candidates" && exists:
				n.Candidates = drawCandidates(t)
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "address" && exists:
				// The controller never readdresses a node; the engine still
				// follows the set elements.
				k := byte(i + 1 + 100*rapid.IntRange(0, 2).Draw(t, "address"))
				n.Addresses = []netip.Addr{netip.AddrFrom4([4]byte{100, 64, 1, k}), netip.AddrFrom16([16]byte{0xfd, 0x5e, 14: 1, 15: k})}
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "key" && exists:
				n.PublicKey = []byte{byte(i), rapid.Byte().Draw(t, "key"), 31: 2}
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "rotation" && exists:
				n.KeyRotation++
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "noaddr" && exists:
				n.Addresses = nil
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "empty":
				m.rev++
				p, err := policy.Parse("p.yaml", []byte("version: 1\n"))
				if err != nil {
					t.Fatal(err)
				}
				m.pol = p
				prog, err := policy.Prepare(m.pol)
				if err != nil {
					t.Fatal(err)
				}
				updates = m.engine.SetPolicy(m.rev, prog)
			case op == "identity" && exists:
				if rapid.Bool().Draw(t, "drop identity") {
					n.IdentityKey = nil
				} else {
					n.IdentityKey = []byte{0x31, byte(i), rapid.Byte().Draw(t, "identity key")}
				}
				m.nodes[name] = n
				updates = m.upsert(n)
			case op == "policy":
				m.rev++
				m.pol = m.drawPolicy()
				prog, err := policy.Prepare(m.pol)
				if err != nil {
					t.Fatal(err)
				}
				updates = m.engine.SetPolicy(m.rev, prog)
			case op == "deny":
				m.rev++
				m.pol = nil
				updates = m.engine.SetPolicy(m.rev, nil)
			case op == "gossip":
				m.cfg.GossipKey = []byte(fmt.Sprintf("k%d", step+1))
				updates = m.engine.SetGossipKey(m.cfg.GossipKey)
			default:
				continue
			}
			if mergeRotation {
				// As the controller's publishLocked: a node that lost the
				// gossip key makes the key rotate, merged into the same updates.
				lost := false
				for _, u := range updates {
					lost = lost || u.LostGossip
				}
				if lost {
					m.cfg.GossipKey = []byte(fmt.Sprintf("r%d", step+1))
					updates = MergeUpdates(updates, m.engine.SetGossipKey(m.cfg.GossipKey))
				}
			}
			m.check(label, updates)
		}
	})
}

func (m *engineModel) upsert(n store.Node) []Update {
	u, err := m.engine.Upsert(n)
	if err != nil {
		m.t.Fatalf("Upsert %s: %v", n.Name, err)
	}
	return u
}

// TestEngineRefusesAddressConflict checks that a node holding another active
// node's address is refused and changes nothing.
func TestEngineRefusesAddressConflict(t *testing.T) {
	a, b := node("web-1", "web", 2), node("db-1", "db", 3)
	e := NewEngine(cfg, 1, nil, []store.Node{a, b})
	before, _, _ := e.Netmap("db-1")
	rogue := node("rogue", "db", 9)
	rogue.Addresses = b.Addresses
	_, err := e.Upsert(rogue)
	if err == nil || !strings.Contains(err.Error(), `"rogue"`) || !strings.Contains(err.Error(), `"db-1"`) {
		t.Fatalf("Upsert of a node with db-1's address: err = %v, want one naming both", err)
	}
	if _, _, ok := e.Netmap("rogue"); ok {
		t.Error("the refused node has a netmap")
	}
	if after, _, _ := e.Netmap("db-1"); !proto.Equal(before, after) {
		t.Error("a refused change changed db-1's netmap")
	}
	b.RevokedAt = time.Unix(1, 0)
	if _, err := e.Upsert(b); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Upsert(rogue); err != nil {
		t.Errorf("the address of a revoked node is refused: %v", err)
	}
}
