package etcdstore

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"segmesh/controller/store"
)

// race runs n goroutines, each with its own Store (own etcd client) on prefix,
// started together; it returns what each returned.
func race(t *testing.T, prefix string, n int, fn func(i int, s *Store) error) []error {
	t.Helper()
	stores := make([]*Store, n)
	for i := range stores {
		stores[i] = openAt(t, prefix, nil)
	}
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			errs[i] = fn(i, stores[i])
		})
	}
	close(start)
	wg.Wait()
	return errs
}

// TestConcurrentPolicyRevisions: 20 controllers each store "latest + 1"; every
// one succeeds (conflicts are retried) and the revisions run 1..20 without a gap.
func TestConcurrentPolicyRevisions(t *testing.T) {
	const n = 20
	prefix := newPrefix(t)
	var runs atomic.Int64
	errs := race(t, prefix, n, func(i int, s *Store) error {
		return s.Update(func(tx store.Tx) error {
			runs.Add(1)
			latest, _, err := tx.LatestPolicy()
			if err != nil {
				return err
			}
			return tx.PutPolicy(store.Policy{Revision: latest.Revision + 1, AppliedBy: fmt.Sprint("controller-", i)})
		})
	})
	for i, err := range errs {
		if err != nil {
			t.Errorf("controller %d: %v", i, err)
		}
	}
	var revs []uint64
	by := map[string]bool{}
	err := openAt(t, prefix, nil).View(func(tx store.Tx) error {
		var err error
		if revs, err = tx.PolicyRevisions(); err != nil {
			return err
		}
		for _, r := range revs {
			p, _, err := tx.Policy(r)
			if err != nil {
				return err
			}
			by[p.AppliedBy] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]uint64, n)
	for i := range want {
		want[i] = uint64(i + 1)
	}
	if !slices.Equal(revs, want) {
		t.Errorf("revisions = %v, want 1..%d", revs, n)
	}
	if len(by) != n {
		t.Errorf("%d distinct writers among the revisions, want %d", len(by), n)
	}
	t.Logf("%d runs of fn for %d commits", runs.Load(), n)
}

// TestConcurrentClaimAddress: 50 controllers claim one address for 50 nodes;
// exactly one wins, the others get ErrAddressInUse.
func TestConcurrentClaimAddress(t *testing.T) {
	const n = 50
	prefix := newPrefix(t)
	a := netip.MustParseAddr("100.64.0.7")
	errs := race(t, prefix, n, func(i int, s *Store) error {
		return s.Update(func(tx store.Tx) error { return tx.ClaimAddress(a, fmt.Sprint("node-", i)) })
	})
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Errorf("nodes %d and %d both claimed %s", winner, i, a)
		case err == nil:
			winner = i
		case !errors.Is(err, store.ErrAddressInUse):
			t.Errorf("node %d: err = %v, want ErrAddressInUse", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no node claimed the address")
	}
	_ = openAt(t, prefix, nil).View(func(tx store.Tx) error {
		owner, ok, err := tx.AddressOwner(a)
		if err != nil || !ok || owner != fmt.Sprint("node-", winner) {
			t.Errorf("AddressOwner = %q %v %v, want node-%d", owner, ok, err, winner)
		}
		return nil
	})
}

// TestConcurrentSingleUseToken: 20 controllers consume one single-use token
// (read it, check it is unused, mark it used); exactly one succeeds.
func TestConcurrentSingleUseToken(t *testing.T) {
	const n = 20
	prefix := newPrefix(t)
	if err := openAt(t, prefix, nil).Update(func(tx store.Tx) error { return tx.PutToken(store.Token{ID: "tok"}) }); err != nil {
		t.Fatal(err)
	}
	errUsed := errors.New("token already used")
	errs := race(t, prefix, n, func(i int, s *Store) error {
		return s.Update(func(tx store.Tx) error {
			tok, ok, err := tx.Token("tok")
			if err != nil || !ok {
				return fmt.Errorf("token: %v %w", ok, err)
			}
			if tok.Uses > 0 {
				return errUsed
			}
			tok.UsedBy, tok.Uses = fmt.Sprint("node-", i), tok.Uses+1
			return tx.PutToken(tok)
		})
	})
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Errorf("nodes %d and %d both used the token", winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, errUsed):
			t.Errorf("node %d: err = %v, want errUsed", i, err)
		}
	}
	_ = openAt(t, prefix, nil).View(func(tx store.Tx) error {
		tok, _, err := tx.Token("tok")
		if err != nil || tok.Uses != 1 || tok.UsedBy != fmt.Sprint("node-", winner) {
			t.Errorf("token = %+v %v, want one use by node-%d", tok, err, winner)
		}
		return nil
	})
}
