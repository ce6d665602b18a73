package controller

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/internal/etcdtest"
	"segmesh/controller/store/etcdstore"
)

// startReplicas starts n controllers on the etcd at endpoint, each with its own
// data directory, all with the same secret key.
//
// Their leases last 30 s: under the race detector on a loaded machine a
// replica can miss its keep-alives for seconds (TestReplicaWithoutLease sets
// its own).
func startReplicas(t *testing.T, endpoint string, n int) []*testController {
	t.Helper()
	return startReplicasWith(t, endpoint, n, 30*time.Second)
}

func startReplicasWith(t *testing.T, endpoint string, n int, ttl time.Duration) []*testController {
	t.Helper()
	key := bytes.Repeat([]byte{0x5e}, 32)
	var out []*testController
	for i := range n {
		dir := filepath.Join(t.TempDir(), "replica", string(rune('a'+i)))
		out = append(out, startControllerWith(t, dir, func(o *Options) {
			o.Store = StoreEtcd
			o.Etcd = etcdstore.Config{Endpoints: []string{endpoint}, SecretKey: key}
			o.LeaseTTL = ttl
		}))
	}
	return out
}

// TestReplicasShareState: two replicas on one etcd share the CA and the admin
// credential; a token created on one enrolls on the other; a policy applied on
// one is in force on the other; Status on either shows every agent online and
// the replica it streams from; a revocation on one ends the agent's stream on
// the other; a single-use token raced on both enrolls one node.
func TestReplicasShareState(t *testing.T) {
	ep := etcdtest.New(t).URL()
	r := startReplicas(t, ep, 2)
	a, b := r[0], r[1]
	if a.cred.CAPEM != b.cred.CAPEM || a.cred.Token != b.cred.Token {
		t.Fatal("the replicas' operator.json differ in CA or token")
	}
	caA, _ := os.ReadFile(filepath.Join(a.dir, "ca.key"))
	caB, _ := os.ReadFile(filepath.Join(b.dir, "ca.key"))
	if len(caA) == 0 || !bytes.Equal(caA, caB) {
		t.Fatal("the replicas have different CA keys")
	}

	tok := a.createToken(map[string]string{"role": "web"}, true)
	web := b.enroll(tok, "web-1")
	db := a.enroll(a.createToken(map[string]string{"role": "db"}, false), "db-1")
	rev := apply(t, a, policyWebDB).Revision
	eventually(t, "replica b serves the policy a stored", func() bool {
		st, err := b.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
		return err == nil && st.Msg.ServingRevision == rev
	})
	s := b.sync(web, &segmeshv1.SyncRequest{Endpoint: "192.0.2.1:51820", Features: []string{featureControllers}})
	nm := s.next(t)
	if nm.PolicyRevision != rev || len(nm.Peers) != 1 || nm.Peers[0].Name != "db-1" {
		t.Fatalf("netmap from b: revision %d peers %v, want revision %d with db-1", nm.PolicyRevision, nm.Peers, rev)
	}
	eventually(t, "a shows web-1 online on b", func() bool {
		st, err := a.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
		if err != nil {
			return false
		}
		for _, n := range st.Msg.Nodes {
			if n.Name == "web-1" {
				return n.Online && n.Controller == replicaName(b.url)
			}
		}
		return false
	})
	st, err := a.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(st.Msg.Controllers, b.url) || st.Msg.Controllers[0] != a.url || st.Msg.Store == "" {
		t.Errorf("status: controllers %v store %q, want %s first and %s", st.Msg.Controllers, st.Msg.Store, a.url, b.url)
	}

	// A revocation on a reaches web-1's peer db... and db-1 revoked on a ends
	// nothing on b; revoke web-1 on a: its stream on b gets the revoked netmap.
	if _, err := a.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "web-1"})); err != nil {
		t.Fatal(err)
	}
	if nm := s.next(t); !nm.Revoked {
		t.Fatalf("after the revocation on a, b sent a netmap that is not revoked: %v", nm)
	}
	_ = db

	// One single-use token, 20 enrollments spread over both replicas: one wins.
	single := a.createToken(map[string]string{"role": "ops"}, false)
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := r[i%2].tryEnroll(single, "ops-"+string(rune('a'+i)), newIdentity(t), "192.0.2.9:51820"); err == nil {
				mu.Lock()
				wins++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if wins != 1 {
		t.Errorf("%d enrollments with one single-use token succeeded, want 1", wins)
	}
}

// TestReplicasConcurrentEnroll: 200 concurrent enrollments with one reusable
// token spread over three replicas all succeed with distinct addresses (and
// the token counts 200 uses).
func TestReplicasConcurrentEnroll(t *testing.T) {
	ep := etcdtest.New(t).URL()
	r := startReplicas(t, ep, 3)
	tok := r[0].createToken(map[string]string{"role": "web"}, true)
	const n = 200
	var wg sync.WaitGroup
	addrs := make([][]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// As an agent does, a busy replica (ResourceExhausted) is asked again.
			id := newIdentity(t)
			var resp *segmeshv1.EnrollResponse
			var err error
			for range 100 {
				resp, err = r[i%3].tryEnroll(tok, fmt.Sprintf("web-%d", i), id, "192.0.2.9:51820")
				if connect.CodeOf(err) != connect.CodeResourceExhausted {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			errs[i] = err
			if err == nil {
				addrs[i] = resp.Addresses
			}
		}()
	}
	wg.Wait()
	seen := map[string]int{}
	failed := 0
	for i := range n {
		if errs[i] != nil {
			failed++
			if failed <= 3 {
				t.Errorf("enrollment %d on replica %d: %v", i, i%3, errs[i])
			}
			continue
		}
		for _, a := range addrs[i] {
			if j, dup := seen[a]; dup {
				t.Errorf("address %s given to enrollments %d and %d", a, j, i)
			}
			seen[a] = i
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d enrollments failed", failed, n)
	}
	if len(seen) != 2*(n-failed) {
		t.Errorf("%d distinct addresses for %d enrollments, want two each", len(seen), n-failed)
	}
	toks, err := r[1].op().ListTokens(bg, connect.NewRequest(&segmeshv1.ListTokensRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, tk := range toks.Msg.Tokens {
		if tk.Uses != n {
			t.Errorf("token %s counts %d uses, want %d", tk.Id, tk.Uses, n)
		}
	}
}

// TestReplicaWithoutLease: a replica cut off from etcd ends its agents'
// streams and refuses calls with Unavailable, saying why; once etcd is back it
// serves again.
func TestReplicaWithoutLease(t *testing.T) {
	etcd := etcdtest.New(t)
	a := startReplicasWith(t, etcd.URL(), 1, 2*time.Second)[0]
	web := a.enroll(a.createToken(map[string]string{"role": "web"}, false), "web-1")
	s := a.sync(web, &segmeshv1.SyncRequest{Endpoint: "192.0.2.1:51820"})
	s.next(t)
	etcd.Stop()
	select {
	case err := <-s.err:
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "etcd lease") {
			t.Errorf("stream ended with %v, want Unavailable naming the etcd lease", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the stream did not end within 30 s of etcd stopping")
	}
	_, err := a.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
	if ce := wantCode(t, err, connect.CodeUnavailable); !strings.Contains(ce.Message(), "quorum") || !strings.Contains(ce.Message(), "another controller replica") {
		t.Errorf("refusal %q does not say why and what to do", ce.Message())
	}
	etcd.Start()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := a.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{})); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no Status within 30 s of etcd starting again: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestURLsFor: this replica stays first, every URL once, and nodes spread over
// the others as their second choice.
func TestURLsFor(t *testing.T) {
	urls := []string{"https://a", "https://b", "https://c", "https://d"}
	second := map[string]int{}
	for i := range 300 {
		got := urlsFor(fmt.Sprintf("node-%d", i), urls)
		if got[0] != urls[0] || len(got) != len(urls) {
			t.Fatalf("urlsFor = %v", got)
		}
		sorted := slices.Clone(got)
		slices.Sort(sorted)
		if !slices.Equal(sorted, urls) {
			t.Fatalf("urlsFor = %v, not a permutation of %v", got, urls)
		}
		second[got[1]]++
	}
	for _, u := range urls[1:] {
		if second[u] < 50 {
			t.Errorf("%s is the second choice of %d of 300 nodes: %v", u, second[u], second)
		}
	}
}

// TestStoreUnavailable: a call that fails because etcd does not answer is
// refused with Unavailable (so that clients try another replica), not Internal,
// also while the replica still holds its lease.
func TestStoreUnavailable(t *testing.T) {
	etcd := etcdtest.New(t)
	a := startReplicas(t, etcd.URL(), 1)[0]
	etcd.Stop()
	_, err := a.op().CreateToken(bg, connect.NewRequest(&segmeshv1.CreateTokenRequest{Reusable: true}))
	if ce := wantCode(t, err, connect.CodeUnavailable); !strings.Contains(ce.Message(), "another controller replica") {
		t.Errorf("refusal %q does not say what to do", ce.Message())
	}
}
