package agent

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/enroll"
	"segmesh/agent/statefile"
	"segmesh/api/jointoken"
)

// identity returns the stored identity, enrolling first when there is none. Flags
// that may change between starts (controller URL, interface, listen port) update the
// stored identity; a different node name is an error.
func (a *agent) identity(ctx context.Context, pub wgtypes.Key) (statefile.Identity, error) {
	id, err := a.dir.Identity()
	switch {
	case errors.Is(err, statefile.ErrNotEnrolled):
		return a.enroll(ctx, pub)
	case err != nil:
		return id, err
	}
	o := a.opts
	if o.Name != "" && o.Name != id.NodeName {
		return id, fmt.Errorf("state directory %s is enrolled as node %q, not %q: drop --name, or use a new state directory to enroll another node", a.dir.Path(), id.NodeName, o.Name)
	}
	changed := false
	update := func(field string, cur *string, v string) {
		if v != "" && v != *cur {
			a.log.Info("updating enrolled identity", "field", field, "old", *cur, "new", v)
			*cur, changed = v, true
		}
	}
	update("controller", &id.Controller, o.Controller)
	update("interface", &id.Interface, o.Interface)
	if o.ListenPort != 0 && o.ListenPort != id.ListenPort {
		a.log.Info("updating enrolled identity", "field", "listen_port", "old", id.ListenPort, "new", o.ListenPort)
		id.ListenPort, changed = o.ListenPort, true
	}
	if changed {
		if err := a.dir.SaveIdentity(id); err != nil {
			return id, err
		}
	}
	a.log.Info("using enrolled identity", "node", id.NodeName, "addresses", id.Addresses, "interface", id.Interface)
	return id, nil
}

// enroll performs the first enrollment, retrying with backoff while the controller
// is unavailable and giving up at once when it refuses.
func (a *agent) enroll(ctx context.Context, pub wgtypes.Key) (statefile.Identity, error) {
	o := a.opts
	if o.Controller == "" || o.Token == "" {
		var missing []string
		if o.Controller == "" {
			missing = append(missing, "--controller URL")
		}
		if o.Token == "" {
			missing = append(missing, "a join token (--token-file FILE, $SEGMESH_TOKEN or --token)")
		}
		return statefile.Identity{}, fmt.Errorf("state directory %s holds no identity: the first start needs %s", a.dir.Path(), strings.Join(missing, " and "))
	}
	tlsKey, err := a.dir.TLSKey()
	if err != nil {
		return statefile.Identity{}, err
	}
	id := statefile.Identity{
		Controller: o.Controller,
		Interface:  o.Interface,
		ListenPort: o.ListenPort,
	}
	if id.Interface == "" {
		id.Interface = DefaultInterface
	}
	if id.ListenPort == 0 {
		id.ListenPort = DefaultListenPort
	}
	res, err := a.enrollWithRetry(ctx, id, o.Name, pub, tlsKey)
	if err != nil || res == nil {
		return id, err
	}
	id.NodeName = res.NodeName
	id.Addresses = res.Addresses
	id.Labels = res.Labels
	id.OverlayPrefixes = res.OverlayPrefixes
	if err := a.dir.SaveEnrollment(id, res.CADER, res.CertDER); err != nil {
		return id, err
	}
	a.log.Info("enrolled", "node", id.NodeName, "addresses", id.Addresses, "labels", id.Labels)
	a.enrolledNow = true
	return id, nil
}

// enrollWithRetry calls EnrollService.Enroll with the join token in Options for
// node name (empty: the controller derives it), WireGuard public key pub and TLS key
// tlsKey, at id's controller; it retries with backoff while the controller is
// unavailable and returns at once when it refuses. It returns nil, nil when ctx
// ends first.
func (a *agent) enrollWithRetry(ctx context.Context, id statefile.Identity, name string, pub wgtypes.Key, tlsKey *ecdsa.PrivateKey) (*enroll.Result, error) {
	tok, err := jointoken.Decode(a.opts.Token)
	if err != nil {
		return nil, fmt.Errorf("reading the join token: %w", err)
	}
	hostname, _ := os.Hostname()
	bo := newBackoff(time.Second, maxBackoff)
	for {
		ep, err := discoverEndpoint(a.opts.Endpoint, id.Controller, id.ListenPort)
		if err == nil {
			actx, cancel := context.WithTimeout(ctx, 30*time.Second)
			var res *enroll.Result
			res, err = enroll.Enroll(actx, enroll.Request{
				Controller: id.Controller,
				Token:      tok,
				Name:       name,
				Hostname:   hostname,
				PublicKey:  pub[:],
				Endpoint:   ep.String(),
				TLSKey:     tlsKey,
			})
			cancel()
			if err == nil {
				return res, nil
			}
		}
		if ctx.Err() != nil {
			return nil, nil
		}
		if !enroll.Retryable(err) && !errors.Is(err, errNoRoute) {
			return nil, err
		}
		d := bo.next()
		a.log.Warn("enrollment failed; retrying", "err", err, "in", d.Round(time.Millisecond))
		if !sleep(ctx, d) {
			return nil, nil
		}
	}
}

// errNoRoute means the kernel has no route to the controller (yet); callers retry.
var errNoRoute = errors.New("no route")

// discoverEndpoint returns the endpoint to advertise: the explicit one ("host:port",
// host resolved), or the local address the kernel routes to the controller with
// listenPort. The UDP "dial" sends no packet; it only asks the kernel for a route.
func discoverEndpoint(explicit, controller string, listenPort int) (netip.AddrPort, error) {
	if explicit != "" {
		ua, err := net.ResolveUDPAddr("udp", explicit)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("resolving --endpoint %q: %w", explicit, err)
		}
		ap := ua.AddrPort()
		if ap.Port() == 0 || !ap.Addr().IsValid() || ap.Addr().IsUnspecified() {
			return netip.AddrPort{}, fmt.Errorf("--endpoint %q: want a host and a non-zero port", explicit)
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	if err := checkControllerURL("controller URL", controller); err != nil {
		return netip.AddrPort{}, err
	}
	u, _ := url.Parse(controller)
	port := u.Port()
	if port == "" {
		port = "443"
	}
	c, err := net.Dial("udp", net.JoinHostPort(u.Hostname(), port))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w to the controller %s: %w", errNoRoute, u.Host, err)
	}
	defer c.Close()
	la := c.LocalAddr().(*net.UDPAddr).AddrPort()
	return netip.AddrPortFrom(la.Addr().Unmap(), uint16(listenPort)), nil
}

func wgKey(k [32]byte) wgtypes.Key { return wgtypes.Key(k) }

// checkControllerURL refuses a controller URL that is not https://HOST[:PORT]: the
// join token and the node's credentials must never travel in cleartext, and a URL
// without a host cannot be dialled. what names the URL's source in the error (for
// example "--controller").
func checkControllerURL(what, raw string) error {
	const want = "want https://HOST:PORT, e.g. https://192.0.2.1:7443"
	u, err := url.Parse(raw)
	if err != nil || u.Opaque != "" {
		return fmt.Errorf("%s %q is not a URL; %s", what, raw, want)
	}
	switch {
	case u.Scheme == "":
		return fmt.Errorf("%s %q has no scheme; %s", what, raw, want)
	case u.Scheme != "https":
		return fmt.Errorf("%s %q: scheme %q refused: the agent talks to the controller only over TLS, so that the join token never travels in cleartext; %s", what, raw, u.Scheme, want)
	case u.Hostname() == "":
		return fmt.Errorf("%s %q has no host; %s", what, raw, want)
	case u.User != nil:
		return fmt.Errorf("%s %q must not carry user information; %s", what, raw, want)
	}
	return nil
}
