package fake

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"segmesh/agent/dataplane"
)

func TestFakeRecordsCanonicalState(t *testing.T) {
	ctx := context.Background()
	d := New(dataplane.KindKernel)
	if s, err := d.Read(ctx); err != nil || !reflect.DeepEqual(s, dataplane.Observed{}) {
		t.Fatalf("Read before Apply = %+v, %v; want the zero state", s, err)
	}
	in := dataplane.State{
		Interface: "x0",
		Addresses: []netip.Prefix{netip.MustParsePrefix("fd00::1/128"), netip.MustParsePrefix("10.0.0.1/32"), netip.MustParsePrefix("10.0.0.1/32")},
		Peers:     []dataplane.Peer{{PublicKey: dataplane.Key{2}}, {PublicKey: dataplane.Key{1}}},
	}
	if err := d.Apply(ctx, in); err != nil {
		t.Fatal(err)
	}
	got, err := d.Read(ctx)
	if err != nil || !reflect.DeepEqual(got.State, dataplane.Canonical(in)) || len(got.Drift) != 0 {
		t.Fatalf("Read = %+v, want Canonical of the applied state", got)
	}
	in.Addresses[0] = netip.MustParsePrefix("192.0.2.1/32") // the fake must hold a copy
	if got2, _ := d.Read(ctx); !reflect.DeepEqual(got, got2) {
		t.Fatal("mutating the caller's state changed the fake")
	}

	d.Mutate(func(s *dataplane.State) { s.Addresses = s.Addresses[1:] })
	if got2, _ := d.Read(ctx); len(got2.Drift) != 1 || got2.Drift[0].Part != dataplane.PartAddress {
		t.Fatalf("Read after Mutate: drift %v, want one address difference", got2.Drift)
	}
	if err := d.Apply(ctx, in); err != nil {
		t.Fatal(err)
	}
	got, _ = d.Read(ctx)

	boom := errors.New("boom")
	d.FailApply(boom)
	if err := d.Apply(ctx, dataplane.State{Interface: "x0"}); !errors.Is(err, boom) {
		t.Fatalf("Apply = %v, want injected error", err)
	}
	if got2, _ := d.Read(ctx); !reflect.DeepEqual(got, got2) {
		t.Fatal("a failed Apply changed the state")
	}
	d.FailApply(nil)
	d.FailRead(boom)
	if _, err := d.Read(ctx); !errors.Is(err, boom) {
		t.Fatalf("Read = %v, want injected error", err)
	}
	d.FailRead(nil)

	d.Mutate(func(s *dataplane.State) { s.Peers = s.Peers[:1] })
	if s, _ := d.State(); len(s.Peers) != 1 {
		t.Fatalf("Mutate did not drift: %+v", s)
	}
	if st := d.Stats(); st.Applies != 2 || len(d.History()) != 2 {
		t.Fatalf("stats %+v, history %d", st, len(d.History()))
	}
	if err := d.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if _, up := d.State(); up {
		t.Fatal("still up after Down")
	}
	if d.Kind() != dataplane.KindKernel || d.Close() != nil || d.Close() != nil || !d.Closed() {
		t.Fatal("Kind/Close")
	}
}

func TestFakeWatch(t *testing.T) {
	d := New(dataplane.KindUserspace)
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := d.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d.Notify()
	d.Notify() // coalesced with the pending one
	<-ch
	select {
	case <-ch:
		t.Fatal("two notifications were not coalesced")
	default:
	}
	cancel()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("watch channel not closed after ctx ended")
		}
	}
}

func TestFakeRefusesInvalidState(t *testing.T) {
	ctx := context.Background()
	d := New(dataplane.KindKernel)
	good := dataplane.State{Interface: "x0", Routes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}
	if err := d.Apply(ctx, good); err != nil {
		t.Fatal(err)
	}
	bad := good
	bad.Routes = []netip.Prefix{netip.MustParsePrefix("10.0.0.1/8")}
	if err := d.Apply(ctx, bad); err == nil || !strings.Contains(err.Error(), "invalid state: route 10.0.0.1/8 has host bits set") {
		t.Fatalf("Apply of an unmasked route = %v, want it refused", err)
	}
	if s, _ := d.State(); !dataplane.Equal(s, good) || d.Stats().Applies != 1 {
		t.Fatalf("a refused Apply changed the state to %+v (stats %+v)", s, d.Stats())
	}
}

func TestFakeDenied(t *testing.T) {
	ctx := context.Background()
	d := New(dataplane.KindKernel)
	if _, err := d.ReadDenied(ctx); err == nil {
		t.Fatal("ReadDenied before Apply succeeded; there is no table")
	}
	if err := d.Apply(ctx, dataplane.State{Interface: "x0"}); err != nil {
		t.Fatal(err)
	}
	if got, err := d.ReadDenied(ctx); err != nil || !reflect.DeepEqual(got, dataplane.Denied{}) {
		t.Fatalf("ReadDenied of a new table = %+v, %v; want nothing dropped", got, err)
	}
	flow := dataplane.DeniedFlow{Direction: dataplane.DirectionIn, Src: netip.MustParseAddr("100.64.0.2"),
		Dst: netip.MustParseAddr("100.64.0.1"), Protocol: 6, Port: 22, Packets: 3, Bytes: 180}
	in := dataplane.Denied{Flows: []dataplane.DeniedFlow{flow}, In: dataplane.DropCounter{Packets: 3, Bytes: 180, Epoch: 1}}
	d.SetDenied(in)
	in.Flows[0].Packets = 99 // the fake must hold a copy
	got, err := d.ReadDenied(ctx)
	if err != nil || len(got.Flows) != 1 || got.Flows[0] != flow || got.In.Packets != 3 {
		t.Fatalf("ReadDenied = %+v, %v; want the flow set", got, err)
	}
	boom := errors.New("boom")
	d.FailReadDenied(boom)
	if _, err := d.ReadDenied(ctx); !errors.Is(err, boom) {
		t.Fatalf("ReadDenied = %v, want the injected error", err)
	}
	d.FailReadDenied(nil)
	if err := d.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadDenied(ctx); err == nil {
		t.Fatal("ReadDenied after Down succeeded; the table is gone")
	}
}
