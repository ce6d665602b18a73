package controller

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/internal/atomicfile"
	"segmesh/controller/netmap"
	"segmesh/controller/pki"
	"segmesh/controller/store"
	"segmesh/policy"
)

// OperatorCredential is the JSON content of DATA_DIR/operator.json: the
// controller URL, its CA certificate (PEM) for verification with ServerName
// "segmesh-controller", and the bearer token sent as "Authorization: Bearer TOKEN".
type OperatorCredential struct {
	Controller string `json:"controller"`
	CAPEM      string `json:"ca_pem"`
	Token      string `json:"token"`
}

// loadOrCreateOperator returns the operator token from path, creating the file
// (mode 0600) with a new random token when missing, and rewriting it when the
// controller URL or CA changed.
func loadOrCreateOperator(path, controllerURL string, caPEM []byte, shared string) (string, error) {
	var cred OperatorCredential
	raw, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := json.Unmarshal(raw, &cred); err != nil {
			return "", fmt.Errorf("parsing operator credential %s: %w", path, err)
		}
		if cred.Token == "" {
			return "", fmt.Errorf("operator credential %s has no token", path)
		}
		if cred.Controller == controllerURL && cred.CAPEM == string(caPEM) {
			return cred.Token, nil
		}
	case errors.Is(err, os.ErrNotExist) && shared != "":
		cred.Token = shared
	case errors.Is(err, os.ErrNotExist):
		b := make([]byte, 32)
		if _, err := rand.Read(b); err != nil {
			return "", fmt.Errorf("generating operator token: %w", err)
		}
		cred.Token = base64.RawURLEncoding.EncodeToString(b)
	default:
		return "", fmt.Errorf("reading operator credential: %w", err)
	}
	cred.Controller, cred.CAPEM = controllerURL, string(caPEM)
	out, err := json.MarshalIndent(cred, "", "  ")
	if err != nil {
		return "", fmt.Errorf("encoding operator credential: %w", err)
	}
	if err := atomicfile.Write(path, append(out, '\n'), 0o600); err != nil {
		return "", fmt.Errorf("writing operator credential: %w", err)
	}
	return cred.Token, nil
}

type operatorService struct {
	segmeshv1connect.UnimplementedOperatorServiceHandler
	c *Controller
}

// Status implements OperatorService.Status.
func (s *operatorService) Status(ctx context.Context, req *connect.Request[segmeshv1.StatusRequest]) (*connect.Response[segmeshv1.StatusResponse], error) {
	nodes, serving, err := s.c.nodeStatuses()
	if err != nil {
		return nil, err
	}
	latest, _, problem := s.c.policyStatus()
	resp := &segmeshv1.StatusResponse{PolicyRevision: latest, ServingRevision: serving, PolicyError: problem, Nodes: nodes,
		Store: s.c.storeDesc, Controllers: s.c.controllerURLs(), Controller: replicaName(s.c.advertiseURL)}
	resp.NodesActive, resp.NodesOnline, resp.NodesCurrent = distributionProgress(nodes)
	if req.Msg.GetUnconvergedOnly() {
		resp.Nodes = slices.DeleteFunc(nodes, func(n *segmeshv1.NodeStatus) bool {
			return n.GetState() != stateActive || n.GetOnline() && enforcesDesired(n)
		})
	}
	return connect.NewResponse(resp), nil
}

// enforcesDesired says whether n's agent last reported the netmap the controller
// holds for it (a non-empty hash equal to the desired one).
func enforcesDesired(n *segmeshv1.NodeStatus) bool {
	return n.GetAppliedHash() != "" && n.GetAppliedHash() == n.GetDesiredHash()
}

// distributionProgress counts the active (not revoked) nodes among nodes, those
// of them that are online, and those that enforce their desired netmap: the
// agent's last report named a non-empty hash equal to DesiredHash. A node that
// went offline after such a report still counts as enforcing it (its agent keeps
// the last netmap), so current can exceed online.
func distributionProgress(nodes []*segmeshv1.NodeStatus) (active, online, current uint32) {
	for _, n := range nodes {
		if n.GetState() != stateActive {
			continue
		}
		active++
		if n.GetOnline() {
			online++
		}
		if enforcesDesired(n) {
			current++
		}
	}
	return active, online, current
}

// ListNodes implements OperatorService.ListNodes: every node's status, with the
// WireGuard peers its agent reported.
func (s *operatorService) ListNodes(ctx context.Context, _ *connect.Request[segmeshv1.ListNodesRequest]) (*connect.Response[segmeshv1.ListNodesResponse], error) {
	nodes, _, err := s.c.listNodeStatuses(true)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&segmeshv1.ListNodesResponse{Nodes: nodes}), nil
}

// nodeStatuses returns every node's status sorted by name, without the
// WireGuard peers (as Status has them), and the policy revision in force (which
// can be older than the latest stored revision); see nodeStatus.
func (c *Controller) nodeStatuses() ([]*segmeshv1.NodeStatus, uint64, error) {
	return c.listNodeStatuses(false)
}

// listNodeStatuses is nodeStatuses, with the WireGuard peers when withPeers.
func (c *Controller) listNodeStatuses(withPeers bool) ([]*segmeshv1.NodeStatus, uint64, error) {
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		return nil, 0, connect.NewError(connect.CodeInternal, fmt.Errorf("reading nodes: %w", err))
	}
	rev, _ := c.policyInForce()
	out := make([]*segmeshv1.NodeStatus, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, c.nodeStatus(n, rev, withPeers))
	}
	return out, rev, nil
}

// nodeStatus returns n's status under revision rev, the revision in force:
// DesiredRevision is rev, DesiredHash the hash of the node's latest netmap,
// Segments its segments under rev; AppliedRevision and AppliedHash are what the
// agent last reported, except that AppliedRevision is raised to rev when
// AppliedHash equals DesiredHash. The WireGuard peers its agent reported are
// filled only when withPeers, and never for a revoked node.
func (c *Controller) nodeStatus(n store.Node, rev uint64, withPeers bool) *segmeshv1.NodeStatus {
	st := &segmeshv1.NodeStatus{
		Name:            n.Name,
		DesiredRevision: rev,
		Labels:          n.Labels,
		Addresses:       netmap.HostPrefixes(n.Addresses),
		Endpoint:        n.Endpoint,
		PublicKey:       base64.StdEncoding.EncodeToString(n.PublicKey),
		State:           nodeState(n),
		RevokedBy:       n.RevokedBy,
		EnrolledUnix:    n.EnrolledAt.Unix(),
	}
	if n.Revoked() {
		st.RevokedUnix = n.RevokedAt.Unix()
	}
	if !n.CertNotAfter.IsZero() {
		st.CertExpiresUnix = n.CertNotAfter.Unix()
	}
	st.DesiredHash = c.desiredHash(n.Name)
	st.Segments = c.engine.Segments(n.Name)
	// A revoked node's agent dropped its peers and no longer reports: what it
	// reported before is not shown.
	c.live.fill(st, withPeers && !n.Revoked())
	if st.Online {
		st.Controller = replicaName(c.advertiseURL)
	} else if !n.Revoked() {
		c.fillRemote(st)
	}
	// A netmap keeps the revision at which it last changed (see
	// netmap.FromCompiled), so an agent whose netmap no later revision touched
	// reports an older revision. When it enforces exactly the netmap the
	// current revision wants (same hash), it enforces the current revision.
	if st.AppliedHash != "" && st.AppliedHash == st.DesiredHash && st.AppliedRevision < rev {
		st.AppliedRevision = rev
	}
	return st
}

// desiredHash returns the hash of the netmap the controller holds for node (the
// one its agent should enforce), or "" when it holds none yet.
func (c *Controller) desiredHash(node string) string {
	l, _ := c.hub.Latest(node)
	return l.Hash
}

// validateLabels checks labels with the one label syntax of the policy language
// (policy.CheckLabels), so that a token or a relabel never sets a label that no
// selector could match, and no selector names one that no node could carry.
func validateLabels(labels map[string]string) error { return policy.CheckLabels(labels) }

// CreateToken implements OperatorService.CreateToken.
func (s *operatorService) CreateToken(ctx context.Context, req *connect.Request[segmeshv1.CreateTokenRequest]) (*connect.Response[segmeshv1.CreateTokenResponse], error) {
	c := s.c
	m := req.Msg
	if err := validateLabels(m.GetLabels()); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	if n := m.GetName(); n != "" {
		if err := checkNodeName(n, ""); err != nil {
			return nil, err
		}
	}
	ttl := c.opts.TokenTTL
	switch {
	case m.GetTtlSeconds() < 0:
		return nil, invalidArg("token lifetime %v is negative; give a positive --ttl such as 1h", time.Duration(m.GetTtlSeconds())*time.Second)
	case m.GetTtlSeconds() > int64(pki.CAValidity/time.Second):
		return nil, invalidArg("token lifetime %v exceeds the controller CA lifetime (%v); give a shorter --ttl", time.Duration(m.GetTtlSeconds())*time.Second, pki.CAValidity)
	case m.GetTtlSeconds() > 0:
		ttl = time.Duration(m.GetTtlSeconds()) * time.Second
	}
	tok, err := jointoken.New(c.ca.CACertDER())
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	now := c.now()
	hash := tok.SecretHash()
	rec := store.Token{
		ID: tok.IDString(), SecretHash: hash[:], Labels: m.GetLabels(),
		CreatedAt: now, ExpiresAt: now.Add(ttl), Reusable: m.GetReusable(), Creator: actorOf(ctx), Name: m.GetName(),
	}
	err = c.store.Update(func(tx store.Tx) error {
		if err := tx.PutToken(rec); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{
			Time: now, Actor: actorOf(ctx), Action: "token.create", Object: "token:" + rec.ID, Result: "ok",
			Detail: fmt.Sprintf("name %q labels %s expires %s reusable %v", rec.Name, formatLabelMap(rec.Labels), rec.ExpiresAt.UTC().Format(time.RFC3339), rec.Reusable),
		})
	})
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("storing token: %w", err))
	}
	c.log.Info("join token created", "id", rec.ID, "labels", rec.Labels, "expires", rec.ExpiresAt, "reusable", rec.Reusable)
	return connect.NewResponse(&segmeshv1.CreateTokenResponse{Token: tok.String(), Id: rec.ID, ExpiresUnix: rec.ExpiresAt.Unix()}), nil
}

// ApplyPolicy implements OperatorService.ApplyPolicy: validate (parse, compile
// against the inventory, tests), store as the next revision, publish; see
// storePolicy.
func (s *operatorService) ApplyPolicy(ctx context.Context, req *connect.Request[segmeshv1.ApplyPolicyRequest]) (*connect.Response[segmeshv1.ApplyPolicyResponse], error) {
	filename := req.Msg.GetFilename()
	if filename == "" {
		filename = "policy.yaml"
	}
	res, err := s.c.storePolicy(actorOf(ctx), filename, req.Msg.GetContent(), "policy.apply", 0)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&segmeshv1.ApplyPolicyResponse{Revision: res.revision, Unchanged: res.unchanged, Warnings: res.warnings}), nil
}

// GetPolicy implements OperatorService.GetPolicy; revision 0 is the revision in
// force. NotFound when the revision does not exist or, for 0, when default deny is
// in force.
func (s *operatorService) GetPolicy(ctx context.Context, req *connect.Request[segmeshv1.GetPolicyRequest]) (*connect.Response[segmeshv1.GetPolicyResponse], error) {
	rev := req.Msg.GetRevision()
	if rev == 0 {
		latest, serving, problem := s.c.policyStatus()
		if serving == 0 {
			if latest == 0 {
				return nil, connect.NewError(connect.CodeNotFound, errors.New("no policy has been applied yet (default deny)"))
			}
			return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no policy revision is in force (default deny):\n%s", problem))
		}
		rev = serving
	}
	var p store.Policy
	var ok bool
	err := s.c.store.View(func(tx store.Tx) error {
		var err error
		p, ok, err = tx.Policy(rev)
		return err
	})
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("reading policy revision %d: %w", rev, err))
	}
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("policy revision %d does not exist", rev))
	}
	return connect.NewResponse(&segmeshv1.GetPolicyResponse{
		Revision: rev, Filename: p.Filename, Content: p.Content,
		AppliedUnix: p.AppliedAt.Unix(), AppliedBy: p.AppliedBy,
	}), nil
}
