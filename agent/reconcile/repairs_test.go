package reconcile

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/fake"
)

type fakeDP = fake.Dataplane

func TestBound(t *testing.T) {
	diffs := func(n int, detail string) []dataplane.Difference {
		var out []dataplane.Difference
		for i := range n {
			out = append(out, dataplane.Difference{Part: dataplane.PartRoute, Detail: fmt.Sprintf("%s%d", detail, i)})
		}
		return out
	}
	tests := []struct {
		name      string
		in        []dataplane.Difference
		wantItems int
		wantMore  int
		want      string // String(), when not ""
		check     func(t *testing.T, d Differences)
	}{
		{name: "none", in: nil, want: ""},
		{name: "few are kept whole", in: diffs(2, "missing #"), wantItems: 2, want: "route: missing #0; route: missing #1"},
		{name: "more than MaxDifferences", in: diffs(MaxDifferences+3, "x"), wantItems: MaxDifferences, wantMore: 3,
			want: "route: x0; route: x1; route: x2; route: x3; route: x4; route: x5; route: x6; route: x7; … and 3 more"},
		{name: "long detail is cut", in: diffs(1, strings.Repeat("x", 5000)), wantItems: 1, check: func(t *testing.T, d Differences) {
			got := d.Items[0].Detail
			if len(got) > MaxDetailBytes || !strings.HasSuffix(got, "…") || !strings.HasPrefix(got, "xxx") {
				t.Errorf("detail of %d bytes %q..., want at most %d ending in …", len(got), got[:10], MaxDetailBytes)
			}
		}},
		{name: "cut keeps UTF-8 valid", in: diffs(1, strings.Repeat("é", 400)), wantItems: 1, check: func(t *testing.T, d Differences) {
			if got := d.Items[0].Detail; !utf8.ValidString(got) || len(got) > MaxDetailBytes {
				t.Errorf("detail %q (%d bytes) is not valid UTF-8 of at most %d bytes", got, len(got), MaxDetailBytes)
			}
		}},
		{name: "total size bounds the list", in: diffs(6, strings.Repeat("y", 240)), wantMore: 2,
			// each item is len("route") + 241 bytes = 246; four fit in 1024
			wantItems: 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Bound(tt.in)
			if len(got.Items) != tt.wantItems || got.More != tt.wantMore || got.Len() != len(tt.in) {
				t.Fatalf("Bound: %d items, %d more (Len %d); want %d items, %d more (Len %d)",
					len(got.Items), got.More, got.Len(), tt.wantItems, tt.wantMore, len(tt.in))
			}
			size := 0
			for _, d := range got.Items {
				size += len(d.Part) + len(d.Detail)
			}
			if size > MaxDifferenceBytes {
				t.Errorf("items hold %d bytes, more than %d", size, MaxDifferenceBytes)
			}
			if tt.want != "" || tt.in == nil {
				if s := got.String(); s != tt.want {
					t.Errorf("String() = %q, want %q", s, tt.want)
				}
			}
			if tt.check != nil {
				tt.check(t, got)
			}
		})
	}
}

// TestReconcilerCountsRepairs: every repair of drift found by a read-back is
// counted, timed and described; the status says in sync after each one.
func TestReconcilerCountsRepairs(t *testing.T) {
	r, dp, _ := start(t, time.Hour)
	nm := testNetmap()
	st := wait(t, r, r.SetNetmap(nm))
	if !st.InSync || st.Err != nil || st.Repairs.Count != 0 || !st.Repairs.Last.IsZero() || st.Unrepaired.Len() != 0 {
		t.Fatalf("status after the first apply = %+v, want in sync without repairs", st)
	}
	if got := dp.Stats(); got.Applies != 1 || got.Reads != 1 {
		t.Fatalf("the first step made %d applies and %d reads, want 1 apply confirmed by 1 read-back", got.Applies, got.Reads)
	}
	want := Desired(local, nm, nil)
	steps := []struct {
		name      string
		mutate    func(s *dataplane.State)
		wantFixed string
	}{
		{name: "route removed", mutate: func(s *dataplane.State) { s.Routes = s.Routes[1:] }, wantFixed: "route: missing [100.64.0.0/10]"},
		{name: "filter flushed", mutate: func(s *dataplane.State) { s.Filter = dataplane.Filter{} }, wantFixed: "nftables: set db missing"},
		{name: "peer removed", mutate: func(s *dataplane.State) { s.Peers = s.Peers[1:] }, wantFixed: "peer: AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI= missing"},
	}
	for i, step := range steps {
		dp.Mutate(step.mutate)
		dp.Notify()
		count := uint64(i + 1)
		eventually(t, step.name+" repaired", func() bool { return r.Status().Repairs.Count == count })
		st := r.Status()
		if !st.InSync || st.Err != nil || st.Unrepaired.Len() != 0 {
			t.Errorf("%s: status after the repair = %+v, want in sync", step.name, st)
		}
		if !st.Repairs.Last.Equal(testNow) {
			t.Errorf("%s: last repair at %v, want %v", step.name, st.Repairs.Last, testNow)
		}
		if got := st.Repairs.Fixed.String(); !strings.Contains(got, step.wantFixed) {
			t.Errorf("%s: repair fixed %q, want it to mention %q", step.name, got, step.wantFixed)
		}
		got, _ := dp.State()
		if d := drift(want, got); d != "" {
			t.Fatalf("%s: still drifted: %s", step.name, d)
		}
	}
}

// TestReconcilerInSync: in sync only when the last read-back found the desired
// state; an error shows until a later step succeeds.
func TestReconcilerInSync(t *testing.T) {
	boom := errors.New("nftables: boom")
	readErr := errors.New("netlink: read failed")
	removeRoute := func(s *dataplane.State) { s.Routes = s.Routes[1:] }
	removePeers := func(s *dataplane.State) { s.Peers = nil }
	tests := []struct {
		name string
		// before runs before the netmap is set; break runs after it is enforced
		// (nil: nothing); heal undoes the failure.
		before, breakIt, heal func(dp *fakeDP)
		// wantErr is a substring of Err while broken, "" for none; wantUnrepaired a
		// substring of Unrepaired while broken.
		wantErr, wantUnrepaired string
		// wantRepairs is Repairs.Count once healed.
		wantRepairs uint64
	}{
		{
			name: "the read-back confirming an apply finds drift",
			before: func(dp *fakeDP) {
				dp.OnApply(func(dataplane.State) { dp.OnApply(nil); dp.Mutate(removeRoute) })
			},
			wantUnrepaired: "route: missing [100.64.0.0/10]",
			heal:           func(dp *fakeDP) { dp.Notify() },
			wantRepairs:    1,
		},
		{
			name:           "a failed repair counts when a later apply succeeds",
			breakIt:        func(dp *fakeDP) { dp.Mutate(removePeers); dp.FailApply(boom); dp.Notify() },
			wantErr:        "nftables: boom",
			wantUnrepaired: "peer: AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI= missing",
			heal:           func(dp *fakeDP) { dp.FailApply(nil); dp.Notify() },
			wantRepairs:    1,
		},
		{
			name:        "a read error shows until a read succeeds",
			breakIt:     func(dp *fakeDP) { dp.FailRead(readErr); dp.Notify() },
			wantErr:     "reading dataplane: netlink: read failed",
			heal:        func(dp *fakeDP) { dp.FailRead(nil); dp.Notify() },
			wantRepairs: 0,
		},
		{
			name:        "the read-back confirming an apply fails",
			before:      func(dp *fakeDP) { dp.FailRead(readErr) },
			wantErr:     "reading dataplane back after the apply: netlink: read failed",
			heal:        func(dp *fakeDP) { dp.FailRead(nil); dp.Notify() },
			wantRepairs: 0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, dp, _ := start(t, time.Hour)
			nm := testNetmap()
			if tt.before != nil {
				tt.before(dp)
			}
			st := wait(t, r, r.SetNetmap(nm))
			if tt.breakIt != nil {
				if !st.InSync {
					t.Fatalf("status before the failure = %+v, want in sync", st)
				}
				tt.breakIt(dp)
				eventually(t, "the failure in status", func() bool { return !r.Status().InSync })
				st = r.Status()
			}
			if st.InSync {
				t.Fatalf("status = %+v, want not in sync", st)
			}
			if tt.wantErr == "" && st.Err != nil || tt.wantErr != "" && (st.Err == nil || !strings.Contains(st.Err.Error(), tt.wantErr)) {
				t.Errorf("Err = %v, want %q", st.Err, tt.wantErr)
			}
			if got := st.Unrepaired.String(); tt.wantUnrepaired == "" && got != "" || !strings.Contains(got, tt.wantUnrepaired) {
				t.Errorf("Unrepaired = %q, want %q", got, tt.wantUnrepaired)
			}
			if st.Repairs.Count != 0 {
				t.Errorf("repairs = %d before the repair", st.Repairs.Count)
			}
			if !st.Programmed || st.Revision != 7 {
				t.Errorf("status = %+v, want revision 7 programmed (the apply went through or an earlier one did)", st)
			}

			tt.heal(dp)
			eventually(t, "in sync again", func() bool { st := r.Status(); return st.InSync && st.Err == nil })
			st = r.Status()
			if st.Unrepaired.Len() != 0 || st.Repairs.Count != tt.wantRepairs {
				t.Errorf("status after healing = %+v, want nothing unrepaired and %d repairs", st, tt.wantRepairs)
			}
			if tt.wantRepairs > 0 && !strings.Contains(st.Repairs.Fixed.String(), tt.wantUnrepaired) {
				t.Errorf("repair fixed %q, want %q", st.Repairs.Fixed.String(), tt.wantUnrepaired)
			}
			got, _ := dp.State()
			if d := drift(Desired(local, nm, nil), got); d != "" {
				t.Fatalf("still drifted: %s", d)
			}
		})
	}
}
