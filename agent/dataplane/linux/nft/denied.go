package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"segmesh/agent/dataplane"
	"segmesh/agent/firewall"
)

// Denied reads what the table recorded of the traffic its policy dropped: the
// elements of the denied-flow sets with their counters, and the counters of the
// final drop of chains ingress and egress (with the rule handle as epoch). The
// drop counters are read first, so a packet counted meanwhile shows in a flow but
// not in a drop counter, never the other way. It reads at most
// firewall.DeniedSetSize elements per set and skips keys of another length. Errors:
// the table, a chain, its counted drop or a set is missing (a table this package did
// not write), or a netlink failure.
func (f *Firewall) Denied() (dataplane.Denied, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out dataplane.Denied
	for _, c := range []struct {
		name string
		into *dataplane.DropCounter
	}{{firewall.ChainIngress, &out.In}, {firewall.ChainEgress, &out.Out}} {
		rules, err := f.conn.GetRules(f.table, &nftables.Chain{Name: c.name, Table: f.table})
		if err != nil {
			return dataplane.Denied{}, fmt.Errorf("listing rules of chain %s: %w", c.name, err)
		}
		counted := false
		if n := len(rules); n > 0 {
			r := rules[n-1]
			if len(r.Exprs) == 2 {
				cnt, ok1 := r.Exprs[0].(*expr.Counter)
				v, ok2 := r.Exprs[1].(*expr.Verdict)
				if ok1 && ok2 && v.Kind == expr.VerdictDrop {
					*c.into = dataplane.DropCounter{Packets: cnt.Packets, Bytes: cnt.Bytes, Epoch: r.Handle}
					counted = true
				}
			}
		}
		if !counted {
			return dataplane.Denied{}, fmt.Errorf("chain %s of table inet %s does not end with a counted drop; the agent rewrites the table on its next apply", c.name, TableName)
		}
	}
	for _, d := range firewall.DeniedSets() {
		elems, err := f.conn.GetSetElements(&nftables.Set{Table: f.table, Name: d.Name})
		if err != nil {
			return dataplane.Denied{}, fmt.Errorf("listing elements of set %s: %w", d.Name, err)
		}
		if len(elems) >= firewall.DeniedSetSize {
			out.Full = true
			elems = elems[:firewall.DeniedSetSize]
		}
		for _, e := range elems {
			fl, ok := parseFlowKey(d, e.Key)
			if !ok {
				continue
			}
			if e.Counter != nil {
				fl.Packets, fl.Bytes = e.Counter.Packets, e.Counter.Bytes
			}
			out.Flows = append(out.Flows, fl)
		}
	}
	return out, nil
}

// parseFlowKey decodes the key of an element of denied-flow set d: source and
// destination address, protocol and, for a set with ports, the destination port,
// each field padded to 4 bytes (see keyRegisters). ok is false for a key of another
// length.
func parseFlowKey(d firewall.DeniedSet, key []byte) (fl dataplane.DeniedFlow, ok bool) {
	a := int(addrOffsets[d.Family].length)
	want := 2*a + 4
	if d.Ports {
		want += 4
	}
	if a == 0 || len(key) != want {
		return fl, false
	}
	fl.Direction = dataplane.DirectionIn
	if d.Chain == firewall.ChainEgress {
		fl.Direction = dataplane.DirectionOut
	}
	fl.Src, _ = netip.AddrFromSlice(key[:a])
	fl.Dst, _ = netip.AddrFromSlice(key[a : 2*a])
	fl.Protocol = key[2*a]
	if d.Ports {
		fl.Port = binary.BigEndian.Uint16(key[2*a+4:])
	}
	return fl, true
}
