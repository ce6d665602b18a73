package benchlab

import (
	"fmt"
	"net/netip"

	"segmesh/test/lab"
)

// HasElementCommand is the hidden subcommand a driver's main dispatches to
// RunHasElement: `self has-element TABLE SET ADDR` in a host's namespace exits 0 when
// set SET of table inet TABLE holds ADDR, 1 when it does not, 2 on an error (see
// lab.HasElement).
const HasElementCommand = "has-element"

// RunHasElement is the has-element subcommand; args are TABLE SET ADDR. It returns
// the exit code (see HasElementCommand).
func RunHasElement(args []string) int {
	if len(args) != 3 {
		fmt.Println("usage: has-element TABLE SET ADDR")
		return 2
	}
	addr, err := netip.ParseAddr(args[2])
	if err != nil {
		fmt.Println(err)
		return 2
	}
	ok, err := lab.HasElement(args[0], args[1], addr)
	if err != nil {
		fmt.Println(err)
		return 2
	}
	if !ok {
		return 1
	}
	return 0
}
