package nft

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"segmesh/policy"
)

// verdict is the terminal statement of a rule.
type verdict uint8

const (
	verdictNone verdict = iota
	verdictAccept
	verdictDrop
	verdictJump
)

// ruleSpec is one kernel rule in a comparable form. Every rule this package writes is
// the concatenation, in this order, of optional matches (interface name, conntrack
// state, network family, address set lookup, layer-4 protocol, destination port or
// ICMP type) and an optional verdict, plus userdata (comment and position). Encoding a
// ruleSpec and decoding the kernel's copy of it yields the same ruleSpec; any rule
// that does not have this shape fails to decode.
type ruleSpec struct {
	IIFName, OIFName string
	// CtState is the mask of "ct state & CtState != 0"; 0 means no conntrack match.
	CtState uint32
	// NFProto is unix.NFPROTO_IPV4 or unix.NFPROTO_IPV6; 0 means any family.
	NFProto byte
	// AddrOff/AddrLen locate the address (in the network header) looked up in Set.
	AddrOff, AddrLen uint32
	Set              string
	// L4Proto is the IP protocol number; 0 means any.
	L4Proto     byte
	HasDPort    bool
	DPort       policy.PortRange
	HasICMPType bool
	ICMPType    byte
	Verdict     verdict
	Jump        string
	// Comment is the rule's nft comment (userdata type 0).
	Comment string
	// HasPos/Pos is the position of the FilterRule this kernel rule renders:
	// rule index << 16 | match index (posNoMatch for a rule without matches).
	HasPos bool
	Pos    uint32
	// Unknown describes a kernel rule that failed to decode; never rendered.
	Unknown string
}

// Userdata TLV types. Type 0 is the comment that nft(8) prints; udataPosition is ours
// and ignored by nft(8), which skips unknown rule userdata types.
const (
	udataComment  = 0
	udataPosition = 0x53
	// posNoMatch marks the placeholder rule of a FilterRule without matches.
	posNoMatch = 0xffff
)

// ifnameData returns the 16-byte, NUL-padded interface name nft compares exactly.
func ifnameData(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

// exprs renders s as nftables expressions.
func (s ruleSpec) exprs() []expr.Any {
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
				Mask: binaryutil.NativeEndian.PutUint32(s.CtState), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)})
	}
	if s.NFProto != 0 {
		out = append(out, &expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, cmpEq([]byte{s.NFProto}))
	}
	if s.Set != "" {
		out = append(out,
			&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader,
				Offset: s.AddrOff, Len: s.AddrLen},
			&expr.Lookup{SourceRegister: 1, SetName: s.Set})
	}
	if s.L4Proto != 0 {
		out = append(out, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, cmpEq([]byte{s.L4Proto}))
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
	switch s.Verdict {
	case verdictAccept:
		out = append(out, &expr.Verdict{Kind: expr.VerdictAccept})
	case verdictDrop:
		out = append(out, &expr.Verdict{Kind: expr.VerdictDrop})
	case verdictJump:
		out = append(out, &expr.Verdict{Kind: expr.VerdictJump, Chain: s.Jump})
	}
	return out
}

// userData renders the comment and position TLVs (nil when s has neither).
func (s ruleSpec) userData() []byte {
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

// decodeRule parses a kernel rule into a ruleSpec. It fails with errShape (wrapped)
// for any expression, field or userdata this package does not write.
func decodeRule(exprs []expr.Any, udata []byte) (ruleSpec, error) {
	var s ruleSpec
	if err := s.decodeUserData(udata); err != nil {
		return s, err
	}
	// stage enforces the rendering order; each group may appear at most once.
	const (
		stIIF = iota + 1
		stOIF
		stCt
		stFamily
		stLookup
		stL4
		stDPort
		stICMP
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
				s.NFProto = data[0]
			case expr.MetaKeyL4PROTO:
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
			s.CtState = binaryutil.NativeEndian.Uint32(bw.Mask)
			if s.CtState == 0 {
				return s, fmt.Errorf("%w: empty conntrack state mask", errShape)
			}
			i += 2
		case *expr.Payload:
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
				s.AddrOff, s.AddrLen, s.Set = v.Offset, v.Len, lk.SetName
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
				s.Verdict = verdictAccept
			case expr.VerdictDrop:
				s.Verdict = verdictDrop
			case expr.VerdictJump:
				s.Verdict, s.Jump = verdictJump, v.Chain
			default:
				return s, fmt.Errorf("%w: verdict %d", errShape, v.Kind)
			}
			if s.Verdict != verdictJump && v.Chain != "" {
				return s, fmt.Errorf("%w: verdict with chain", errShape)
			}
		default:
			return s, fmt.Errorf("%w: expression %T", errShape, e)
		}
	}
	return s, nil
}

func (s *ruleSpec) decodeUserData(b []byte) error {
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
