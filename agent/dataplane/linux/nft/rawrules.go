package nft

import (
	"encoding/binary"
	"fmt"

	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// google/nftables silently drops every expression of a type it has no Go type for
// (rt, socket, osf, xfrm, ...), so a rule read through it can look like one segmesh
// wrote while the kernel runs more than that. exprNames therefore dumps the table's
// rules itself and lists, per rule handle, the names of the expressions the kernel
// holds; a rule whose list differs from what the library decoded is of an unknown
// shape.

// exprNames returns the expression names of every rule of table inet segmesh, by
// rule handle (NFT_MSG_GETRULE dump; attributes from linux/netfilter/nf_tables.h).
func exprNames(c *netlink.Conn) (map[uint64][]string, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_RULE_TABLE, TableName)
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE),
			Flags: netlink.Request | netlink.Dump},
		Data: append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, attrs...),
	})
	if err != nil {
		return nil, fmt.Errorf("dumping rules: %w", err)
	}
	out := map[uint64][]string{}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return nil, fmt.Errorf("decoding a rule: %w", err)
		}
		ad.ByteOrder = binary.BigEndian
		var handle uint64
		names := []string{}
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_RULE_HANDLE:
				handle = ad.Uint64()
			case unix.NFTA_RULE_EXPRESSIONS:
				ad.Nested(func(list *netlink.AttributeDecoder) error {
					for list.Next() {
						list.Nested(func(e *netlink.AttributeDecoder) error {
							name := "?"
							for e.Next() {
								if e.Type() == unix.NFTA_EXPR_NAME {
									name = e.String()
								}
							}
							names = append(names, name)
							return nil
						})
					}
					return nil
				})
			}
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("decoding a rule: %w", err)
		}
		out[handle] = names
	}
	return out, nil
}

// sameExpressions reports whether the kernel's expression names of a rule are
// exactly those of the expressions the library decoded.
func sameExpressions(decoded []expr.Any, kernel []string) bool {
	if len(decoded) != len(kernel) {
		return false
	}
	for i, e := range decoded {
		var name string
		switch e.(type) {
		case *expr.Meta:
			name = "meta"
		case *expr.Cmp:
			name = "cmp"
		case *expr.Ct:
			name = "ct"
		case *expr.Bitwise:
			name = "bitwise"
		case *expr.Payload:
			name = "payload"
		case *expr.Lookup:
			name = "lookup"
		case *expr.Range:
			name = "range"
		case *expr.Verdict:
			name = "immediate"
		case *expr.Counter:
			name = "counter"
		case *expr.Dynset:
			name = "dynset"
		default:
			return false // decodeRule refuses it anyway
		}
		if kernel[i] != name {
			return false
		}
	}
	return true
}

// Set attributes the library does not decode (linux/netfilter/nf_tables.h).
const (
	nftaSetExpr        = 17 // NFTA_SET_EXPR: one nested expression
	nftaSetExpressions = 18 // NFTA_SET_EXPRESSIONS: a list of them
)

// setExprNames returns, by set name, the names of the expressions each set of
// table inet segmesh gives its elements (e.g. ["counter"]); the library reads
// none of them back (NFT_MSG_GETSET dump).
func setExprNames(c *netlink.Conn) (map[string][]string, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_SET_TABLE, TableName)
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETSET),
			Flags: netlink.Request | netlink.Dump},
		Data: append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, attrs...),
	})
	if err != nil {
		return nil, fmt.Errorf("dumping sets: %w", err)
	}
	exprName := func(e *netlink.AttributeDecoder) string {
		name := "?"
		for e.Next() {
			if e.Type() == unix.NFTA_EXPR_NAME {
				name = e.String()
			}
		}
		return name
	}
	out := map[string][]string{}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return nil, fmt.Errorf("decoding a set: %w", err)
		}
		ad.ByteOrder = binary.BigEndian
		var name string
		var names []string
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_SET_NAME:
				name = ad.String()
			case nftaSetExpr:
				ad.Nested(func(e *netlink.AttributeDecoder) error {
					names = append(names, exprName(e))
					return nil
				})
			case nftaSetExpressions:
				ad.Nested(func(list *netlink.AttributeDecoder) error {
					for list.Next() {
						list.Nested(func(e *netlink.AttributeDecoder) error {
							names = append(names, exprName(e))
							return nil
						})
					}
					return nil
				})
			}
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("decoding a set: %w", err)
		}
		out[name] = names
	}
	return out, nil
}
