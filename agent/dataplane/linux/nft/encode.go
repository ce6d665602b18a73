package nft

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"segmesh/agent/firewall"
	"segmesh/policy"
)

// addrOffsets locate the source and destination address in the network header of
// each family, and their length in bytes.
var addrOffsets = map[firewall.Family]struct{ src, dst, length uint32 }{
	firewall.FamilyIPv4: {12, 16, 4},
	firewall.FamilyIPv6: {8, 24, 16},
}

// Userdata TLV types. Type 0 is the comment that nft(8) prints; udataPosition is ours
// and ignored by nft(8), which skips unknown rule userdata types.
const (
	udataComment  = 0
	udataPosition = 0x53
)

// ifnameData returns the 16-byte, NUL-padded interface name nft compares exactly.
func ifnameData(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

// ruleExprs renders s as nftables expressions.
func ruleExprs(s firewall.Rule) []expr.Any {
	var out []expr.Any
	cmpEq := func(data []byte) *expr.Cmp { return &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data} }
	if s.IIFName != "" {
		out = append(out, &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, cmpEq(ifnameData(s.IIFName)))
	}
	if s.OIFName != "" {
		out = append(out, &expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1}, cmpEq(ifnameData(s.OIFName)))
	}
	if s.CtState != 0 {
		out = append(out,
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(uint32(s.CtState)), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)})
	}
	if s.Family != firewall.FamilyAny {
		out = append(out, &expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, cmpEq([]byte{byte(s.Family)}))
	}
	if s.Addr != firewall.AddrNone {
		off := addrOffsets[s.Family]
		offset := off.src
		if s.Addr == firewall.AddrDestination {
			offset = off.dst
		}
		out = append(out,
			&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader,
				Offset: offset, Len: off.length},
			&expr.Lookup{SourceRegister: 1, SetName: s.Set})
	}
	if s.NotPortProtocols {
		out = append(out, notPortExprs()...)
	}
	if s.L4Proto != 0 {
		out = append(out, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, cmpEq([]byte{s.L4Proto}))
	}
	if s.HasTCPFlags {
		out = append(out,
			&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{s.TCPFlagsMask}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{s.TCPFlags}})
	}
	if s.HasDPort {
		out = append(out, &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1,
			Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
		if s.DPort.First == s.DPort.Last {
			out = append(out, cmpEq(binaryutil.BigEndian.PutUint16(s.DPort.First)))
		} else {
			out = append(out, &expr.Range{Op: expr.CmpOpEq, Register: 1,
				FromData: binaryutil.BigEndian.PutUint16(s.DPort.First),
				ToData:   binaryutil.BigEndian.PutUint16(s.DPort.Last)})
		}
	}
	if s.HasICMPType {
		out = append(out, &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1,
			Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1}, cmpEq([]byte{s.ICMPType}))
	}
	if s.Counter {
		out = append(out, &expr.Counter{})
	}
	if s.Record != "" {
		out = append(out, recordExprs(s.Family, s.RecordPort, s.Record)...)
	}
	switch s.Verdict {
	case firewall.VerdictAccept:
		out = append(out, &expr.Verdict{Kind: expr.VerdictAccept})
	case firewall.VerdictDrop:
		out = append(out, &expr.Verdict{Kind: expr.VerdictDrop})
	case firewall.VerdictJump:
		out = append(out, &expr.Verdict{Kind: expr.VerdictJump, Chain: s.Jump})
	}
	return out
}

// notPortExprs match a layer-4 protocol other than firewall.PortProtocols.
func notPortExprs() []expr.Any {
	var out []expr.Any
	for _, p := range firewall.PortProtocols {
		out = append(out, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{p}})
	}
	return out
}

// Registers of a record rule's key, as nft(8) allocates them: NFT_REG_1..4 hold 16
// bytes each and alias the 4-byte NFT_REG32_00..15 (8 to 23), so the key's fields
// sit back to back from NFT_REG_1, each padded to 4 bytes.
var keyRegisters = map[firewall.Family]struct{ src, dst, proto, port uint32 }{
	firewall.FamilyIPv4: {1, 9, 10, 11},
	firewall.FamilyIPv6: {1, 2, 3, 17},
}

// dynsetOpUpdate is NFT_DYNSET_OP_UPDATE: add the key, or refresh its timeout.
const dynsetOpUpdate = 1

// recordExprs build the flow key of family (source and destination address,
// protocol, with port the transport header's destination port) and update set
// with it: "update @set { ip saddr . ip daddr . meta l4proto . th dport }".
func recordExprs(family firewall.Family, port bool, set string) []expr.Any {
	off, reg := addrOffsets[family], keyRegisters[family]
	out := []expr.Any{
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg.src, Base: expr.PayloadBaseNetworkHeader, Offset: off.src, Len: off.length},
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg.dst, Base: expr.PayloadBaseNetworkHeader, Offset: off.dst, Len: off.length},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg.proto},
	}
	if port {
		out = append(out, &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg.port, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
	}
	return append(out, &expr.Dynset{SrcRegKey: 1, SetName: set, Operation: dynsetOpUpdate})
}

// decodeRecord parses the record expressions at the start of exprs for family; n
// is how many it took (0: none of that shape).
func decodeRecord(exprs []expr.Any, family firewall.Family) (n int, port bool, set string) {
	if _, ok := addrOffsets[family]; !ok {
		return 0, false, ""
	}
	for _, port := range []bool{true, false} {
		want := recordExprs(family, port, "")
		if len(exprs) < len(want) {
			continue
		}
		d, ok := exprs[len(want)-1].(*expr.Dynset)
		if !ok || d.SetName == "" || d.SrcRegKey != 1 || d.SrcRegData != 0 || d.Operation != dynsetOpUpdate ||
			d.Timeout != 0 || d.Invert || len(d.Exprs) != 0 {
			continue
		}
		same := true
		for i, w := range want[:len(want)-1] {
			same = same && reflect.DeepEqual(w, exprs[i])
		}
		if same {
			return len(want), port, d.SetName
		}
	}
	return 0, false, ""
}

// userData renders the comment and position TLVs (nil when s has neither).
func userData(s firewall.Rule) []byte {
	var b []byte
	if s.Comment != "" {
		b = append(b, udataComment, byte(len(s.Comment)+1))
		b = append(b, s.Comment...)
		b = append(b, 0)
	}
	if s.HasPos {
		b = append(b, udataPosition, 4)
		b = binary.BigEndian.AppendUint32(b, s.Pos)
	}
	return b
}

var errShape = errors.New("rule is not of a shape segmesh writes")

// decodeRule parses a kernel rule into a firewall.Rule. It fails with errShape
// (wrapped) for any expression, field or userdata this package does not write.
func decodeRule(exprs []expr.Any, udata []byte) (firewall.Rule, error) {
	var s firewall.Rule
	if err := decodeUserData(&s, udata); err != nil {
		return s, err
	}
	// stage enforces the rendering order; each group may appear at most once.
	const (
		stIIF = iota + 1
		stOIF
		stCt
		stFamily
		stLookup
		stNotPort
		stL4
		stTCPFlags
		stDPort
		stICMP
		stCounter
		stRecord
		stVerdict
	)
	stage := 0
	advance := func(to int) error {
		if to <= stage {
			return fmt.Errorf("%w: expression group %d after %d", errShape, to, stage)
		}
		stage = to
		return nil
	}
	isReg1Load := func(e expr.Any) bool {
		m, ok := e.(*expr.Meta)
		return ok && m.Register == 1 && !m.SourceRegister
	}
	eqCmp := func(e expr.Any, n int) ([]byte, bool) {
		c, ok := e.(*expr.Cmp)
		if !ok || c.Op != expr.CmpOpEq || c.Register != 1 || (n > 0 && len(c.Data) != n) {
			return nil, false
		}
		return c.Data, true
	}
	for i := 0; i < len(exprs); i++ {
		e := exprs[i]
		var next expr.Any
		if i+1 < len(exprs) {
			next = exprs[i+1]
		}
		switch v := e.(type) {
		case *expr.Meta:
			if !isReg1Load(v) {
				return s, fmt.Errorf("%w: meta %d", errShape, v.Key)
			}
			switch v.Key {
			case expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME:
				data, ok := eqCmp(next, unix.IFNAMSIZ)
				if !ok || bytes.IndexByte(data, 0) < 1 {
					return s, fmt.Errorf("%w: interface name match", errShape)
				}
				name := string(data[:bytes.IndexByte(data, 0)])
				if strings.Trim(string(data[len(name):]), "\x00") != "" {
					return s, fmt.Errorf("%w: interface name padding", errShape)
				}
				if v.Key == expr.MetaKeyIIFNAME {
					if err := advance(stIIF); err != nil {
						return s, err
					}
					s.IIFName = name
				} else {
					if err := advance(stOIF); err != nil {
						return s, err
					}
					s.OIFName = name
				}
			case expr.MetaKeyNFPROTO:
				data, ok := eqCmp(next, 1)
				if !ok || data[0] == 0 {
					return s, fmt.Errorf("%w: family match", errShape)
				}
				if err := advance(stFamily); err != nil {
					return s, err
				}
				s.Family = firewall.Family(data[0])
				if _, ok := addrOffsets[s.Family]; !ok {
					return s, fmt.Errorf("%w: family %d", errShape, data[0])
				}
			case expr.MetaKeyL4PROTO:
				if c, ok := next.(*expr.Cmp); ok && c.Op == expr.CmpOpNeq {
					want := notPortExprs()
					if len(exprs)-i < len(want) || !reflect.DeepEqual(want, exprs[i:i+len(want)]) {
						return s, fmt.Errorf("%w: protocol exclusion", errShape)
					}
					if err := advance(stNotPort); err != nil {
						return s, err
					}
					s.NotPortProtocols = true
					i += len(want) - 2 // the loop's i++ and the one below take the rest
					break
				}
				data, ok := eqCmp(next, 1)
				if !ok || data[0] == 0 {
					return s, fmt.Errorf("%w: protocol match", errShape)
				}
				if err := advance(stL4); err != nil {
					return s, err
				}
				s.L4Proto = data[0]
			default:
				return s, fmt.Errorf("%w: meta key %d", errShape, v.Key)
			}
			i++
		case *expr.Ct:
			bw, ok1 := next.(*expr.Bitwise)
			var cmp *expr.Cmp
			ok2 := false
			if i+2 < len(exprs) {
				cmp, ok2 = exprs[i+2].(*expr.Cmp)
			}
			if v.Key != expr.CtKeySTATE || v.Register != 1 || v.SourceRegister || v.Direction != 0 || !ok1 || !ok2 ||
				bw.SourceRegister != 1 || bw.DestRegister != 1 || bw.Len != 4 || len(bw.Mask) != 4 ||
				!bytes.Equal(bw.Xor, make([]byte, 4)) ||
				cmp.Op != expr.CmpOpNeq || cmp.Register != 1 || !bytes.Equal(cmp.Data, make([]byte, 4)) {
				return s, fmt.Errorf("%w: conntrack state match", errShape)
			}
			if err := advance(stCt); err != nil {
				return s, err
			}
			s.CtState = firewall.CtState(binaryutil.NativeEndian.Uint32(bw.Mask))
			if s.CtState == 0 {
				return s, fmt.Errorf("%w: empty conntrack state mask", errShape)
			}
			i += 2
		case *expr.Counter:
			if err := advance(stCounter); err != nil {
				return s, err
			}
			s.Counter = true // its values are kernel state
		case *expr.Payload:
			if n, port, set := decodeRecord(exprs[i:], s.Family); n > 0 {
				if err := advance(stRecord); err != nil {
					return s, err
				}
				s.Record, s.RecordPort = set, port
				if port && !slices.Contains(firewall.PortProtocols, s.L4Proto) {
					return s, fmt.Errorf("%w: port key for protocol %d", errShape, s.L4Proto)
				}
				i += n - 1
				break
			}
			if v.OperationType != expr.PayloadLoad || v.DestRegister != 1 || v.SourceRegister != 0 || v.CsumType != 0 ||
				v.CsumOffset != 0 || v.CsumFlags != 0 {
				return s, fmt.Errorf("%w: payload", errShape)
			}
			switch {
			case v.Base == expr.PayloadBaseNetworkHeader:
				lk, ok := next.(*expr.Lookup)
				if !ok || lk.SourceRegister != 1 || lk.IsDestRegSet || lk.DestRegister != 0 || lk.Invert || lk.SetName == "" {
					return s, fmt.Errorf("%w: address lookup", errShape)
				}
				if err := advance(stLookup); err != nil {
					return s, err
				}
				off, ok := addrOffsets[s.Family]
				switch {
				case !ok || v.Len != off.length:
					return s, fmt.Errorf("%w: address lookup without its family match", errShape)
				case v.Offset == off.src:
					s.Addr = firewall.AddrSource
				case v.Offset == off.dst:
					s.Addr = firewall.AddrDestination
				default:
					return s, fmt.Errorf("%w: address lookup at offset %d", errShape, v.Offset)
				}
				s.Set = lk.SetName
			case v.Base == expr.PayloadBaseTransportHeader && v.Offset == 2 && v.Len == 2:
				if err := advance(stDPort); err != nil {
					return s, err
				}
				s.HasDPort = true
				if data, ok := eqCmp(next, 2); ok {
					p := binary.BigEndian.Uint16(data)
					s.DPort = policy.PortRange{First: p, Last: p}
				} else if r, ok := next.(*expr.Range); ok && r.Op == expr.CmpOpEq && r.Register == 1 &&
					len(r.FromData) == 2 && len(r.ToData) == 2 {
					s.DPort = policy.PortRange{First: binary.BigEndian.Uint16(r.FromData), Last: binary.BigEndian.Uint16(r.ToData)}
					if s.DPort.First >= s.DPort.Last {
						return s, fmt.Errorf("%w: port range", errShape)
					}
				} else {
					return s, fmt.Errorf("%w: port match", errShape)
				}
			case v.Base == expr.PayloadBaseTransportHeader && v.Offset == 13 && v.Len == 1:
				bw, ok1 := next.(*expr.Bitwise)
				var cmp *expr.Cmp
				ok2 := false
				if i+2 < len(exprs) {
					cmp, ok2 = exprs[i+2].(*expr.Cmp)
				}
				if !ok1 || !ok2 || bw.SourceRegister != 1 || bw.DestRegister != 1 || bw.Len != 1 || len(bw.Mask) != 1 ||
					!bytes.Equal(bw.Xor, []byte{0}) || cmp.Op != expr.CmpOpNeq || cmp.Register != 1 || len(cmp.Data) != 1 {
					return s, fmt.Errorf("%w: tcp flags match", errShape)
				}
				if err := advance(stTCPFlags); err != nil {
					return s, err
				}
				s.HasTCPFlags, s.TCPFlagsMask, s.TCPFlags = true, bw.Mask[0], cmp.Data[0]
				i++ // the bitwise; the loop's i++ takes the cmp
			case v.Base == expr.PayloadBaseTransportHeader && v.Offset == 0 && v.Len == 1:
				data, ok := eqCmp(next, 1)
				if !ok {
					return s, fmt.Errorf("%w: icmp type match", errShape)
				}
				if err := advance(stICMP); err != nil {
					return s, err
				}
				s.HasICMPType, s.ICMPType = true, data[0]
			default:
				return s, fmt.Errorf("%w: payload base %d offset %d", errShape, v.Base, v.Offset)
			}
			i++
		case *expr.Verdict:
			if err := advance(stVerdict); err != nil {
				return s, err
			}
			switch v.Kind {
			case expr.VerdictAccept:
				s.Verdict = firewall.VerdictAccept
			case expr.VerdictDrop:
				s.Verdict = firewall.VerdictDrop
			case expr.VerdictJump:
				s.Verdict, s.Jump = firewall.VerdictJump, v.Chain
			default:
				return s, fmt.Errorf("%w: verdict %d", errShape, v.Kind)
			}
			if s.Verdict != firewall.VerdictJump && v.Chain != "" {
				return s, fmt.Errorf("%w: verdict with chain", errShape)
			}
		default:
			return s, fmt.Errorf("%w: expression %T", errShape, e)
		}
	}
	return s, nil
}

func decodeUserData(s *firewall.Rule, b []byte) error {
	for len(b) > 0 {
		if len(b) < 2 || len(b) < 2+int(b[1]) {
			return fmt.Errorf("%w: truncated userdata", errShape)
		}
		typ, val := b[0], b[2:2+int(b[1])]
		b = b[2+int(b[1]):]
		switch typ {
		case udataComment:
			if len(val) == 0 || val[len(val)-1] != 0 || s.Comment != "" {
				return fmt.Errorf("%w: comment", errShape)
			}
			s.Comment = string(val[:len(val)-1])
		case udataPosition:
			if len(val) != 4 || s.HasPos {
				return fmt.Errorf("%w: position", errShape)
			}
			s.HasPos, s.Pos = true, binary.BigEndian.Uint32(val)
		default:
			return fmt.Errorf("%w: userdata type %d", errShape, typ)
		}
	}
	return nil
}
