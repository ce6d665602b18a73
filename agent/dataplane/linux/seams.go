package linux

import (
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// wgClient is the part of wgctrl.Client the dataplane uses: it reads and configures
// WireGuard devices by name (kernel ones over generic netlink, wireguard-go ones over
// their UAPI socket). A missing device is os.ErrNotExist. internal/fakewg is the
// in-memory one of the tests.
type wgClient interface {
	Device(name string) (*wgtypes.Device, error)
	ConfigureDevice(name string, cfg wgtypes.Config) error
	Close() error
}

// links is the part of *netlink.Handle (rtnetlink in the dataplane's namespace) the
// dataplane uses for the overlay link, its addresses and its routes.
// internal/fakelinks is the in-memory one of the tests.
type links interface {
	LinkByName(name string) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkDel(link netlink.Link) error
	LinkSetMTU(link netlink.Link, mtu int) error
	LinkSetUp(link netlink.Link) error
	LinkSetIP6AddrGenMode(link netlink.Link, mode int) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrAdd(link netlink.Link, addr *netlink.Addr) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
	RouteReplace(route *netlink.Route) error
	RouteDel(route *netlink.Route) error
	Close()
}

var (
	_ wgClient = (*wgctrl.Client)(nil)
	_ links    = (*netlink.Handle)(nil)
)
