package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

func newTokenCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Manage join tokens"}
	var (
		labels   []string
		ttl      time.Duration
		reusable bool
		name     string
	)
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a join token that binds labels; prints only the token",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			lm, err := parseLabels(labels)
			if err != nil {
				return err
			}
			resp, err := invoke(g, "creating token", segmeshv1connect.OperatorServiceClient.CreateToken,
				&segmeshv1.CreateTokenRequest{Labels: lm, TtlSeconds: int64(ttl / time.Second), Reusable: reusable, Name: name})
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), resp.GetToken())
			return nil
		},
	}
	create.Flags().StringArrayVar(&labels, "label", nil, "label k=v bound to nodes enrolled with this token (repeatable)")
	create.Flags().DurationVar(&ttl, "ttl", 0, "validity, e.g. 1h (default: the controller's --token-ttl)")
	create.Flags().BoolVar(&reusable, "reusable", false, "allow enrolling more than one node with this token")
	create.Flags().StringVar(&name, "name", "", "bind the token to this node name (needed for a name that a segment of the policy lists under nodes:)")
	cmd.AddCommand(create, newTokenListCmd(g), newTokenRevokeCmd(g))
	return cmd
}

// tokenJSON is the JSON (and YAML) shape of one join token in `token list`; it
// never holds the secret (the controller keeps only its hash).
type tokenJSON struct {
	ID        string            `json:"id"`
	Labels    map[string]string `json:"labels"`
	CreatedAt string            `json:"created_at,omitempty"`
	ExpiresAt string            `json:"expires_at,omitempty"`
	Reusable  bool              `json:"reusable"`
	// Uses counts successful enrollments; UsedBy names the first node enrolled.
	Uses    int64  `json:"uses"`
	UsedBy  string `json:"used_by,omitempty"`
	Creator string `json:"creator,omitempty"` // operator credential name
	// Name is the node name the token is bound to; empty for any name.
	Name      string `json:"name,omitempty"`
	RevokedAt string `json:"revoked_at,omitempty"`
	// State is "valid", "used" (single-use, spent), "expired" or "revoked".
	State string `json:"state"`
}

func toTokenJSON(t *segmeshv1.TokenInfo, now time.Time) tokenJSON {
	out := tokenJSON{
		ID: t.GetId(), Labels: t.GetLabels(), CreatedAt: unixTime(t.GetCreatedUnix()), ExpiresAt: unixTime(t.GetExpiresUnix()),
		Reusable: t.GetReusable(), Uses: t.GetUses(), UsedBy: t.GetUsedBy(), Creator: t.GetCreator(), RevokedAt: unixTime(t.GetRevokedUnix()),
		Name: t.GetName(),
	}
	if out.Labels == nil {
		out.Labels = map[string]string{}
	}
	switch {
	case t.GetRevokedUnix() != 0:
		out.State = "revoked"
	case t.GetExpiresUnix() != 0 && now.Unix() >= t.GetExpiresUnix():
		out.State = "expired"
	case !t.GetReusable() && t.GetUses() > 0:
		out.State = "used"
	default:
		out.State = "valid"
	}
	return out
}

func newTokenListCmd(g *globalFlags) *cobra.Command {
	return readCmd(&cobra.Command{
		Use:   "list",
		Short: "List join tokens: id, labels, created, expires, uses, used by, creator, state (never the secret)",
		Args:  cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		resp, err := invoke(g, "listing tokens", segmeshv1connect.OperatorServiceClient.ListTokens, &segmeshv1.ListTokensRequest{})
		if err != nil {
			return nil, nil, err
		}
		now := time.Now()
		tokens := make([]tokenJSON, 0, len(resp.GetTokens()))
		for _, t := range resp.GetTokens() {
			tokens = append(tokens, toTokenJSON(t, now))
		}
		return tokens, func(w io.Writer) error {
			rows := make([][]string, 0, len(tokens))
			for _, t := range tokens {
				uses := fmt.Sprint(t.Uses)
				if !t.Reusable {
					uses += "/1"
				}
				rows = append(rows, []string{t.ID, t.Name, formatLabels(t.Labels), t.CreatedAt, t.ExpiresAt, uses, t.UsedBy, t.Creator, t.State})
			}
			return writeTable(w, []string{"ID", "NAME", "LABELS", "CREATED", "EXPIRES", "USES", "USED_BY", "CREATOR", "STATE"}, rows)
		}, nil
	})
}

func newTokenRevokeCmd(g *globalFlags) *cobra.Command {
	return argCmd("revoke ID", "Revoke a join token (ID from `segmesh token list`): it enrolls no further node",
		`Revoke makes the join token unusable from now on. Nodes already enrolled with
it stay enrolled; revoke them with `+"`segmesh nodes revoke`"+`.`,
		func(w io.Writer, id string) error {
			if _, err := invoke(g, "revoking token "+id, segmeshv1connect.OperatorServiceClient.RevokeToken,
				&segmeshv1.RevokeTokenRequest{Id: id}); err != nil {
				return err
			}
			_, err := fmt.Fprintf(w, "token %s revoked: it enrolls no further node; nodes already enrolled with it stay\n", id)
			return err
		})
}

// parseLabels turns ["k=v", ...] into a map; the controller validates the syntax.
func parseLabels(kvs []string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: --label %q: want key=value, e.g. --label role=db", kv)}
		}
		if strings.Contains(v, "=") {
			return nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: --label %q: one label per flag; repeat it, e.g. --label role=web --label env=prod", kv)}
		}
		if _, dup := out[k]; dup {
			return nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: --label %q: key %q given twice", kv, k)}
		}
		out[k] = v
	}
	return out, nil
}
