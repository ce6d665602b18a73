package fanout

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"pgregory.net/rapid"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
	"segmesh/policy"
)

var attackPolicies = []string{mesh, `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
rules:
  - name: web-to-db
    from: [web]
    to: [db]
    ports: [tcp/5432]
`, `version: 1
rules:
  - name: all
    from: [all]
    to: [all]
    ports: [any]
`}

func prepare(t interface{ Fatal(...any) }, src string) *policy.Program {
	p, err := policy.Parse("p.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	prog, err := policy.Prepare(p)
	if err != nil {
		t.Fatal(err)
	}
	return prog
}

// TestStreamsFollowEngine drives an Engine and a Hub as the controller does
// (updates merged with a gossip key rotation when a node loses the key), with a
// delta stream per node that reads at random moments (coalescing bursts,
// sometimes overflowing MaxPending), and checks that every stream's agent ends
// at its node's current netmap.
func TestStreamsFollowEngine(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		names := []string{"a", "b", "c", "d", "e"}
		cfg := netmap.Config{GossipKey: []byte("k"), GossipPort: 7946, OverlayPrefixes: []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10")}}
		e := netmap.NewEngine(cfg, 1, prepare(t, attackPolicies[0]), nil)
		h := New(e, map[string]Latest{})
		subs := map[string]*Subscription{}
		held := map[string]*segmeshv1.Netmap{}
		rev := uint64(1)
		read := func(name string) {
			s := subs[name]
			for {
				select {
				case <-s.Wake():
				default:
					return
				}
				u, ok := s.Next()
				if !ok {
					continue
				}
				if f := u.GetFull(); f != nil {
					held[name] = f
					continue
				}
				nm, err := wire.ApplyDelta(held[name], u.GetDelta())
				if err != nil {
					t.Fatalf("%s: applying a delta: %v", name, err)
				}
				held[name] = nm
			}
		}
		publish := func(us []netmap.Update) {
			for _, u := range us {
				if u.LostGossip {
					key := []byte(fmt.Sprintf("k%d", rapid.Int().Draw(t, "key")))
					us = netmap.MergeUpdates(us, e.SetGossipKey(key))
					break
				}
			}
			h.Publish(us)
		}
		for step := range rapid.IntRange(1, 60).Draw(t, "steps") {
			i := rapid.IntRange(0, len(names)-1).Draw(t, "node")
			name := names[i]
			_, exists := subs[name]
			switch op := rapid.SampledFrom([]string{"upsert", "revoke", "delete", "policy", "read", "burst"}).Draw(t, "op"); {
			case op == "upsert":
				n := store.Node{Name: name, Labels: map[string]string{"role": rapid.SampledFrom([]string{"web", "db"}).Draw(t, "role")},
					Addresses: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)})}, PublicKey: []byte{byte(i), byte(step), 31: 1}}
				us, err := e.Upsert(n)
				if err != nil {
					t.Fatal(err)
				}
				if !exists {
					subs[name] = h.Subscribe(name, true)
				}
				publish(us)
			case op == "revoke" && exists:
				us, err := e.Upsert(store.Node{Name: name, RevokedAt: time.Unix(1, 0)})
				if err != nil {
					t.Fatal(err)
				}
				publish(us)
			case op == "delete" && exists:
				publish(e.Remove(name))
				subs[name].Close() // the stream ends: the node is no longer enrolled
				delete(subs, name)
				delete(held, name)
			case op == "policy":
				rev++
				publish(e.SetPolicy(rev, prepare(t, rapid.SampledFrom(attackPolicies).Draw(t, "policy"))))
			case op == "read" && exists:
				read(name)
			case op == "burst":
				for range MaxPending + 1 {
					key := []byte(fmt.Sprintf("burst%d", rapid.Int().Draw(t, "key")))
					publish(e.SetGossipKey(key))
				}
			}
		}
		for name := range subs {
			read(name)
			want, _, _ := e.Netmap(name)
			if !proto.Equal(held[name], want) {
				t.Fatalf("%s holds\n%v\nwant\n%v", name, held[name], want)
			}
		}
	})
}

// TestPublishRacesNext runs Publish and Next concurrently (go test -race) and
// checks that the agent ends at the current netmap.
func TestPublishRacesNext(t *testing.T) {
	e, h := fixture(t)
	s := h.Subscribe("web-1", true)
	var held *segmeshv1.Netmap
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 300 {
			role := "web"
			if i%3 == 0 {
				role = "db"
			}
			h.Publish(must(e.Upsert(node("web-2", role, 2))))
			if i%7 == 0 {
				h.Publish(e.SetGossipKey([]byte{byte(i), 1}))
			}
		}
		close(done)
	}()
	for {
		select {
		case <-s.Wake():
		case <-done:
			wg.Wait()
			held = drain(t, s, held)
			if want := current(t, e, "web-1"); !proto.Equal(held, want) {
				t.Fatalf("web-1 holds %v, want %v", held, want)
			}
			return
		}
		if u, ok := s.Next(); ok {
			held = apply(t, held, u)
		}
	}
}

// TestReenrolledNameGetsItsNetmap: db-1 is deleted and a node of the same name
// enrolls before db-1's stream reads again (in the controller: the stream is
// busy in a slow send, and the new node has the same TLS key, so the stream's
// next authentication passes). The Engine numbers the new node's netmaps from 1
// again; the stream must still bring its agent to the new node's netmap, not
// keep the deleted node's (or apply the new node's deltas to it).
func TestReenrolledNameGetsItsNetmap(t *testing.T) {
	for _, changes := range []int{0, 1, 3} {
		t.Run(fmt.Sprintf("%d changes after enrolling", changes), func(t *testing.T) {
			e, h := fixture(t)
			s := h.Subscribe("db-1", true)
			defer s.Close()
			held := apply(t, nil, next(t, s))
			n := node("db-1", "db", 3)
			n.Endpoint = "192.0.2.9:51820"
			h.Publish(must(e.Upsert(n))) // version 2
			held = apply(t, held, next(t, s))
			h.Publish(e.Remove("db-1"))
			h.Publish(must(e.Upsert(node("db-1", "web", 9)))) // the new node: a web server, with peers
			for i := range changes {
				n := node("db-1", "web", 9)
				n.Endpoint = fmt.Sprintf("192.0.2.1:%d", 1000+i)
				h.Publish(must(e.Upsert(n)))
			}
			held = drain(t, s, held)
			if want := current(t, e, "db-1"); !proto.Equal(held, want) {
				t.Fatalf("the stream's agent holds\n%v\nthe new db-1's netmap is\n%v", held, want)
			}
		})
	}
}

// drain applies every update s yields to held, as its agent would, and returns
// the result.
func drain(t *testing.T, s *Subscription, held *segmeshv1.Netmap) *segmeshv1.Netmap {
	t.Helper()
	for {
		u, ok := s.Next()
		if !ok {
			return held
		}
		held = apply(t, held, u)
	}
}
