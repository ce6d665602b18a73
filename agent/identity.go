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
	"slices"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/enroll"
	"segmesh/agent/statefile"
	"segmesh/api/jointoken"
)

// identity returns the stored identity, enrolling first when there is none. Flags
// that may change between starts (controller URLs, interface, listen port) update the
// stored identity; a different node name is an error. Controller URLs given go
// first, before the stored ones (see mergeControllers), and the first of them is
// used first; stored URLs that are not https://HOST[:PORT] are then dropped with a
// warning (without --controller, setup refuses them).
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
	if len(o.Controllers) > 0 {
		stored, bad := checkControllerURLs("the controller URL in "+a.dir.Path(), id.Controllers)
		for _, err := range bad {
			a.log.Warn("dropping a stored controller URL", "err", err)
		}
		merged := mergeControllers(o.Controllers, stored)
		if !slices.Equal(merged, id.Controllers) {
			a.log.Info("updating enrolled identity", "field", "controllers", "old", strings.Join(id.Controllers, ","), "new", strings.Join(merged, ","))
			id.Controllers, changed = merged, true
		}
		update("controller", &id.Controller, o.Controllers[0])
	}
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
	a.log.Info("using enrolled identity", "node", id.NodeName, "addresses", id.Addresses, "interface", id.Interface,
		"controller", id.Controller, "controllers", len(id.Controllers))
	return id, nil
}

// enroll performs the first enrollment, trying the controller URLs in turn and
// retrying with backoff while none is available, giving up at once when one
// refuses.
func (a *agent) enroll(ctx context.Context, pub wgtypes.Key) (statefile.Identity, error) {
	o := a.opts
	if len(o.Controllers) == 0 || o.Token == "" {
		var missing []string
		if len(o.Controllers) == 0 {
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
		Controllers: o.Controllers,
		Interface:   o.Interface,
		ListenPort:  o.ListenPort,
	}
	if id.Interface == "" {
		id.Interface = DefaultInterface
	}
	if id.ListenPort == 0 {
		id.ListenPort = DefaultListenPort
	}
	res, url, err := a.enrollWithRetry(ctx, o.Controllers, id.ListenPort, o.Name, pub, tlsKey)
	if err != nil || res == nil {
		return id, err
	}
	id.Controller = url
	id.NodeName = res.NodeName
	id.Addresses = res.Addresses
	id.Labels = res.Labels
	id.OverlayPrefixes = res.OverlayPrefixes
	if err := a.dir.SaveEnrollment(id, res.CADER, res.CertDER); err != nil {
		return id, err
	}
	a.log.Info("enrolled", "node", id.NodeName, "addresses", id.Addresses, "labels", id.Labels, "controller", url)
	a.enrolledNow = true
	return id, nil
}

// enrollWithRetry calls EnrollService.Enroll with the join token in Options for
// node name (empty: the controller derives it), WireGuard public key pub and TLS key
// tlsKey (advertising an endpoint with listenPort), at each of the controller URLs
// urls in turn: a controller that is unreachable or unavailable (enroll.Retryable,
// or no route to it) moves on to the next URL at once, and after every URL failed
// so the round starts over after a backoff (1 s doubling to 30 s). A refusal (or a
// CA that does not match the token) is returned at once: the replicas share one
// store, so another would refuse too. It returns the result and the URL that
// answered, or nil, "", nil when ctx ends first.
func (a *agent) enrollWithRetry(ctx context.Context, urls []string, listenPort int, name string, pub wgtypes.Key, tlsKey *ecdsa.PrivateKey) (*enroll.Result, string, error) {
	tok, err := jointoken.Decode(a.opts.Token)
	if err != nil {
		return nil, "", fmt.Errorf("reading the join token: %w", err)
	}
	hostname, _ := os.Hostname()
	bo := newBackoff(time.Second, maxBackoff)
	for {
		for i, url := range urls {
			ep, err := discoverEndpoint(a.opts.Endpoint, url, listenPort)
			if err == nil {
				actx, cancel := context.WithTimeout(ctx, 30*time.Second)
				var res *enroll.Result
				res, err = enroll.Enroll(actx, enroll.Request{
					Controller: url,
					Token:      tok,
					Name:       name,
					Hostname:   hostname,
					PublicKey:  pub[:],
					Endpoint:   ep.String(),
					TLSKey:     tlsKey,
				})
				cancel()
				if err == nil {
					return res, url, nil
				}
			}
			if ctx.Err() != nil {
				return nil, "", nil
			}
			if !enroll.Retryable(err) && !errors.Is(err, errNoRoute) {
				return nil, "", err
			}
			if i < len(urls)-1 {
				a.log.Warn("enrollment failed; trying the next controller", "controller", url, "err", err, "next", urls[i+1])
				continue
			}
			d := bo.next()
			if len(urls) == 1 {
				a.log.Warn("enrollment failed; retrying", "err", err, "in", d.Round(time.Millisecond))
			} else {
				a.log.Warn("enrollment failed at every controller; retrying", "controller", url, "err", err, "in", d.Round(time.Millisecond))
			}
			if !sleep(ctx, d) {
				return nil, "", nil
			}
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
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		return fmt.Errorf("%s %q must not carry a query or fragment; %s", what, raw, want)
	}
	return nil
}
