package policy

import (
	"fmt"
	"net/netip"
)

// CheckExternal reports every external CIDR of p that overlaps one of the overlay
// prefixes: an external segment names addresses outside the overlay, and one that
// covered overlay addresses would let its rules match nodes by address, bypassing
// label selection. The errors carry the cidr's position; nil when there is none.
func CheckExternal(p *Policy, overlay []netip.Prefix) ErrorList {
	var errs ErrorList
	for _, seg := range p.Segments {
		for _, c := range seg.CIDRs {
			for _, o := range overlay {
				if c.Prefix.Overlaps(o) {
					errs = append(errs, &Error{Pos: c.Pos, Msg: fmt.Sprintf(
						"external segment %q: cidr %s overlaps the overlay prefix %s; external segments hold addresses outside the overlay, select nodes with selectors or nodes instead",
						seg.Name, c.Prefix, o)})
				}
			}
		}
	}
	return errs
}
