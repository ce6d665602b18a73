package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
	"segmesh/agent/statefile"
	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
)

// This file is the node identity's life cycle: revocation, certificate renewal and
// expiry, re-enrollment, and WireGuard key rotation.

// ---------------------------------------------------------------- revocation

// isRevokedError reports whether err is the controller cutting this node off: the
// controller answers every AgentService call of a node an operator revoked (or
// deleted) with connect code PermissionDenied, and uses that code for nothing else
// on that service.
func isRevokedError(err error) bool {
	return connect.CodeOf(err) == connect.CodePermissionDenied
}

// connectMessage is the controller's message in err without the code prefix, or
// err's text.
func connectMessage(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Message() != "" {
		return ce.Message()
	}
	return err.Error()
}

func (a *agent) isRevoked() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.revoked
}

// markRevoked records that the node is revoked and, the first time, tells the
// operator what that means and how to bring the host back.
func (a *agent) markRevoked(reason string) {
	a.mu.Lock()
	told := a.told
	a.revoked, a.told = true, true
	a.mu.Unlock()
	if !told {
		a.log.Error(fmt.Sprintf("this node was revoked by an operator (or deleted): the agent dropped every peer, keeps a default-deny filter, "+
			"stopped gossip and status reports, and asks the controller only every %s; to bring this host back, an operator must "+
			"run `segmesh nodes delete %s` (unless done already) and then start the agent with a new join token (--token-file FILE)", maxBackoff, a.id.NodeName),
			"node", a.id.NodeName, "reason", reason)
	}
}

// clearRevoked forgets a revocation (the controller serves the node again); it
// reports whether the node was revoked.
func (a *agent) clearRevoked() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	was := a.revoked
	a.revoked, a.told = false, false
	return was
}

// enterRevoked puts the node at default deny: it stores pb (a revoked netmap; nil
// makes one from the identity, when the controller refused a call instead of
// sending one) so that a restart stays there, applies it and stops gossip.
func (a *agent) enterRevoked(ctx context.Context, pb *segmeshv1.Netmap, nm *netmap.Netmap, reason string) {
	a.netmapMu.Lock()
	if pb == nil {
		if a.isRevoked() {
			a.netmapMu.Unlock()
			return
		}
		pb = a.revokedNetmap()
		var err error
		if nm, err = netmap.Parse(pb); err != nil {
			a.netmapMu.Unlock()
			a.log.Error("building the revoked netmap", "err", err)
			return
		}
	}
	if cur := a.rec.Netmap(); a.isRevoked() && cur != nil && cur.Revoked && cur.Hash == nm.Hash && a.rec.Status().Err == nil {
		a.netmapMu.Unlock()
		return // the controller said so again (every reconnect): nothing changes
	}
	if err := a.dir.SaveNetmap(pb); err != nil {
		a.log.Error("storing the revoked netmap; a restart applies the previous netmap until the controller refuses the node again", "err", err)
	}
	a.markRevoked(reason)
	gen := a.rec.SetNetmap(nm)
	a.netmapMu.Unlock()
	st, err := a.rec.Wait(ctx, gen)
	if err != nil {
		return
	}
	if st.Err != nil {
		a.log.Error("applying default deny failed; retrying every resync", "err", st.Err)
	}
	signal(a.gossipC)
}

// revokedNetmap is the netmap of this node once revoked: itself, its overlay
// prefixes, nothing else.
func (a *agent) revokedNetmap() *segmeshv1.Netmap {
	pb := &segmeshv1.Netmap{
		Self:            &segmeshv1.Node{Name: a.id.NodeName, Addresses: a.id.Addresses},
		OverlayPrefixes: a.id.OverlayPrefixes,
		Revoked:         true,
	}
	if cur := a.rec.Netmap(); cur != nil {
		pb.PolicyRevision = cur.Revision
	}
	pb.Hash = wire.NetmapHash(pb)
	return pb
}

// ---------------------------------------------------------------- certificate

// certificate returns the current node certificate (with its key and Leaf).
func (a *agent) certificate() *tls.Certificate {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cert
}

// loadCertificate loads the node certificate and its TLS key from the state
// directory.
func (a *agent) loadCertificate() error {
	cert, err := a.dir.ClientCertificate()
	if err != nil {
		return err
	}
	key, ok := cert.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || cert.Leaf == nil {
		return fmt.Errorf("loading node certificate: want an ECDSA key and a parsed certificate, got %T", cert.PrivateKey)
	}
	a.setCertificate(&cert, key)
	return nil
}

func (a *agent) setCertificate(cert *tls.Certificate, key *ecdsa.PrivateKey) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.cert, a.tlsKey, a.expired = cert, key, false
}

// certificateExpired reports whether the node certificate's NotAfter has passed.
// The first time it has, it logs what that means: the agent keeps enforcing its
// last netmap (fail static) and needs a new join token.
func (a *agent) certificateExpired() bool {
	a.mu.Lock()
	cert := a.cert
	if cert == nil || cert.Leaf == nil {
		a.mu.Unlock()
		return false
	}
	expired := !time.Now().Before(cert.Leaf.NotAfter)
	first := expired && !a.expired
	a.expired = expired
	a.mu.Unlock()
	if first {
		a.log.Error(fmt.Sprintf("the node certificate expired at %s: the agent keeps enforcing its last netmap (fail static) but can no longer "+
			"reach the controller; to re-enroll as %s with its current keys, restart it with a new join token (--token-file FILE)",
			cert.Leaf.NotAfter.UTC().Format(time.RFC3339), a.id.NodeName),
			"node", a.id.NodeName, "not_after", cert.Leaf.NotAfter.UTC())
	}
	return expired
}

// renewalTime is when a certificate should be renewed: when a third of its
// lifetime (NotAfter - NotBefore) remains.
func renewalTime(leaf *x509.Certificate) time.Time {
	return leaf.NotAfter.Add(-leaf.NotAfter.Sub(leaf.NotBefore) / 3)
}

// renewLoop renews the node certificate once a third of its lifetime remains. It
// checks at start, at the renewal time, every resync interval and on renewC;
// failures are retried with backoff (1 s doubling to 30 s). A revoked node, or one
// whose certificate expired, does not try.
func (a *agent) renewLoop(ctx context.Context) {
	bo := newBackoff(time.Second, maxBackoff)
	var retryAt time.Time
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		d := a.opts.Resync
		if !a.certificateExpired() && !a.isRevoked() {
			now := time.Now()
			at := renewalTime(a.certificate().Leaf)
			switch {
			case now.Before(at):
				bo.reset()
				d = min(d, at.Sub(now))
			case now.Before(retryAt):
				d = min(d, retryAt.Sub(now))
			default:
				err := a.syncer.renew(ctx)
				if ctx.Err() != nil {
					return
				}
				if err == nil {
					bo.reset()
					retryAt = time.Time{}
					continue
				}
				wait := bo.next()
				retryAt = now.Add(wait)
				a.log.Warn("renewing the node certificate failed; retrying", "err", err, "in", wait.Round(time.Millisecond),
					"not_after", a.certificate().Leaf.NotAfter.UTC())
				d = min(d, wait)
			}
		}
		timer.Reset(d)
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-a.renewC:
		}
	}
}

// renew generates a new TLS key on the host, has the controller certify it over the
// current mutual-TLS connection, checks the certificate, stores key and certificate
// (crash-safely, see statefile) and switches to them: new connections present the
// new certificate, the open stream is reopened, and gossip signs with the new key.
func (s *syncer) renew(ctx context.Context) error {
	a := s.a
	key, err := a.dir.NewNextTLSKey()
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: a.id.NodeName}}, key)
	if err != nil {
		return fmt.Errorf("creating certificate request: %w", err)
	}
	client, rctx, cancel := s.call(ctx, 30*time.Second)
	defer cancel()
	resp, err := client.RenewCertificate(rctx, connect.NewRequest(&segmeshv1.RenewCertificateRequest{CsrDer: csr}))
	if err != nil {
		s.checkRevoked(ctx, err)
		a.discardNextTLSKey()
		return fmt.Errorf("asking the controller for a new certificate: %w", err)
	}
	der := resp.Msg.GetCertificateDer()
	leaf, err := a.checkNodeCertificate(der, key)
	if err != nil {
		a.discardNextTLSKey()
		return fmt.Errorf("checking the renewed certificate: %w", err)
	}
	// The controller refuses the previous certificate from now on: use the new one
	// even if storing it fails.
	if err := a.dir.CommitCertificate(der); err != nil {
		a.log.Error("storing the renewed certificate failed; the agent uses it until it stops, but a restart presents the previous one, which the controller refuses",
			"err", err)
	}
	old := a.certificate().Leaf.NotAfter
	a.setCertificate(&tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, key)
	a.log.Info("renewed the node certificate with a new TLS key", "node", a.id.NodeName,
		"not_after", leaf.NotAfter.UTC(), "previous_not_after", old.UTC())
	signal(a.gossipC)
	s.reconnect(errReconnect)
	return nil
}

func (a *agent) discardNextTLSKey() {
	if err := a.dir.DiscardNextTLSKey(); err != nil {
		a.log.Warn("removing the key of a failed renewal", "err", err)
	}
}

// checkNodeCertificate parses der and checks that it is a client certificate for
// key's public key, with this node's name as common name, that verifies against
// the stored CA now.
func (a *agent) checkNodeCertificate(der []byte, key *ecdsa.PrivateKey) (*x509.Certificate, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing: %w", err)
	}
	pool, err := a.dir.CAPool()
	if err != nil {
		return nil, err
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, err
	}
	if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&key.PublicKey) {
		return nil, errors.New("it is not for the new TLS key")
	}
	if cert.Subject.CommonName != a.id.NodeName {
		return nil, fmt.Errorf("common name %q, want the node name %q", cert.Subject.CommonName, a.id.NodeName)
	}
	return cert, nil
}

// ---------------------------------------------------------------- re-enrollment

// reenrollIfNeeded re-enrolls under the enrolled name when the agent was started
// with a join token and its certificate expired, or the node is revoked (an
// operator must have deleted it since). It keeps the current TLS and WireGuard keys:
// the controller accepts re-enrollment of an existing name only for the node's
// current TLS key. A refusal is logged and the agent carries on as it was (fail
// static, or default deny). It returns false when ctx ended.
func (a *agent) reenrollIfNeeded(ctx context.Context) bool {
	expired, revoked := a.certificateExpired(), a.isRevoked()
	if a.opts.Token == "" {
		return true
	}
	if !expired && !revoked {
		if !a.enrolledNow {
			a.log.Info("already enrolled; ignoring the join token", "node", a.id.NodeName)
		}
		return true
	}
	why := "the node certificate expired"
	if revoked {
		why = "the node was revoked"
	}
	a.log.Info("re-enrolling with the join token", "node", a.id.NodeName, "because", why)
	priv, tlsKey := a.keys()
	res, url, err := a.enrollWithRetry(ctx, a.ctl.inTurn(), a.id.ListenPort, a.id.NodeName, wgKey(priv).PublicKey(), tlsKey)
	if ctx.Err() != nil {
		return false
	}
	if err != nil {
		state := "keeps enforcing its last netmap (fail static)"
		if revoked {
			state = "stays at default deny"
		}
		a.log.Error("re-enrollment failed; the agent "+state, "node", a.id.NodeName, "because", why, "err", err)
		if revoked {
			a.markRevoked("re-enrollment refused: " + connectMessage(err))
		}
		return true
	}
	a.ctl.use(url)
	id := a.id
	id.Addresses, id.Labels, id.OverlayPrefixes = res.Addresses, res.Labels, res.OverlayPrefixes
	id.Controllers, id.Controller = a.ctl.snapshot()
	if err := a.dir.SaveEnrollment(id, res.CADER, res.CertDER); err != nil {
		a.log.Error("storing the re-enrollment failed", "err", err)
		return true
	}
	a.id = id
	a.setStored(id)
	if revoked {
		if err := a.dir.RemoveNetmap(); err != nil {
			a.log.Warn("removing the revoked netmap", "err", err)
		}
		a.clearRevoked()
	}
	if err := a.loadCertificate(); err != nil {
		a.log.Error("loading the new node certificate", "err", err)
		return true
	}
	a.log.Info("re-enrolled", "node", id.NodeName, "addresses", id.Addresses, "labels", id.Labels, "not_after", a.certificate().Leaf.NotAfter.UTC())
	return true
}

// ---------------------------------------------------------------- key rotation

// rotateLoop performs the WireGuard key rotations the netmap asks for (rotateC is
// signalled for every netmap and at start); failures are retried with backoff
// (1 s doubling to 30 s).
func (a *agent) rotateLoop(ctx context.Context) {
	bo := newBackoff(time.Second, maxBackoff)
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.rotateC:
		case <-retry:
		}
		retry = nil
		if err := a.rotateStep(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.next()
			a.log.Warn("WireGuard key rotation failed; retrying", "err", err, "in", d.Round(time.Millisecond))
			retry = time.After(d)
			continue
		}
		bo.reset()
	}
}

// rotateStep starts or finishes a rotation. The order makes a crash at any point
// recoverable: (1) the new key is stored as pending (wireguard.key.next), (2) the
// controller is told its public key (RotateKey), (3) the completed generation is
// stored in identity.json, (4) the pending key is renamed over wireguard.key and
// programmed. A pending key with a generation still to do is retried at (2) with
// the same key (the controller accepts a repeated call with the same key); one
// whose generation is recorded is finished at (4).
func (a *agent) rotateStep(ctx context.Context) error {
	nm := a.rec.Netmap()
	if nm == nil || nm.Revoked || a.certificateExpired() {
		return nil
	}
	a.mu.Lock()
	done := a.keyGen
	a.mu.Unlock()
	if nm.KeyRotation > done {
		return a.rotate(ctx, nm.KeyRotation)
	}
	pending, err := a.dir.HasNextWireGuardKey()
	if err != nil || !pending {
		return err
	}
	return a.commitKey(ctx, done)
}

// rotate performs rotation generation gen (steps 1 to 4 of rotateStep).
func (a *agent) rotate(ctx context.Context, gen uint64) error {
	k, created, err := a.dir.NextWireGuardKey()
	if err != nil {
		return err
	}
	pub := k.PublicKey()
	if created {
		a.log.Info("generated a new WireGuard key for the rotation an operator asked for", "generation", gen, "public_key", pub.String())
	} else {
		a.log.Info("retrying the WireGuard key rotation with the pending key", "generation", gen, "public_key", pub.String())
	}
	client, rctx, cancel := a.syncer.call(ctx, 30*time.Second)
	defer cancel()
	if _, err := client.RotateKey(rctx, connect.NewRequest(&segmeshv1.RotateKeyRequest{PublicKey: pub[:], Generation: gen})); err != nil {
		a.syncer.checkRevoked(ctx, err)
		return fmt.Errorf("telling the controller the new WireGuard key (generation %d): %w", gen, err)
	}
	// Recorded before the switch: a retry after a failure here repeats the call with
	// the same key, which the controller accepts.
	if err := a.saveIdentity(func(id *statefile.Identity) { id.KeyGeneration = gen }); err != nil {
		return fmt.Errorf("recording the completed key rotation %d: %w", gen, err)
	}
	a.mu.Lock()
	a.keyGen = gen
	a.mu.Unlock()
	return a.commitKey(ctx, gen)
}

// commitKey makes the pending WireGuard key the device's key (step 4).
func (a *agent) commitKey(ctx context.Context, gen uint64) error {
	k, err := a.dir.CommitWireGuardKey()
	if err != nil {
		return err
	}
	key := dataplane.Key(k)
	a.mu.Lock()
	a.wgKey = key
	a.mu.Unlock()
	st, err := a.rec.Wait(ctx, a.rec.SetPrivateKey(key))
	if err != nil {
		return nil // ctx ended; the next start programs the key from wireguard.key
	}
	signal(a.gossipC) // advertise the new public key
	if st.Err != nil {
		a.log.Error("programming the new WireGuard key failed; retrying every resync", "err", st.Err)
	}
	a.log.Info("rotated the WireGuard key", "generation", gen, "public_key", k.PublicKey().String())
	return nil
}
