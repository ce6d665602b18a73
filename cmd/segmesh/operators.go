package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// Operator roles as the controller names them.
const (
	roleAdmin  = "admin"
	roleViewer = "viewer"
)

func newOperatorsCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "operators", Short: "Manage operator credentials and their roles (admin: changes, viewer: reads)"}
	cmd.AddCommand(newOperatorsCreateCmd(g), newOperatorsListCmd(g), newOperatorsRevokeCmd(g))
	return cmd
}

func newOperatorsCreateCmd(g *globalFlags) *cobra.Command {
	var role, out string
	cmd := &cobra.Command{
		Use:   "create NAME --role admin|viewer [--out FILE]",
		Short: "Create an operator credential and write it to a file (mode 0600)",
		Long: `Create makes a new operator credential with a role: admin may change
everything, viewer only reads (status, nodes, policy show/history/render/explain,
token and operator lists, audit). It writes the credential file, in the format
of the controller's operator.json, to FILE (default ./operator-NAME.json) with
mode 0600: the controller URLs and CA certificate of the credential in use, and
the new bearer token, which the controller shows only once. An existing FILE is
never overwritten. Pass the file to its holder; they use it with --credentials.`,
		Args: oneArg("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if role != roleAdmin && role != roleViewer {
				return &exitError{code: 2, msg: fmt.Sprintf("segmesh: --role %q: want admin or viewer", role)}
			}
			if out == "" {
				out = "operator-" + name + ".json"
			}
			mine, err := loadCredentials(g)
			if err != nil {
				return err
			}
			// Claim the file before the credential exists, so that a bad --out does
			// not leave a credential nobody holds.
			f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if errors.Is(err, fs.ErrExist) {
				return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s exists; not overwriting it (choose another --out, or remove it)", out)}
			}
			if err != nil {
				return &exitError{code: 2, msg: fmt.Sprintf("segmesh: creating the credential file: %v", err)}
			}
			resp, err := invoke(g, "creating operator "+name, segmeshv1connect.OperatorServiceClient.CreateOperator,
				&segmeshv1.CreateOperatorRequest{Name: name, Role: role})
			if err != nil {
				_ = f.Close()
				_ = os.Remove(out)
				return err
			}
			if err := writeCredentials(f, newCredentials(mine.urls(), mine.CAPEM, resp.GetToken())); err != nil {
				_ = os.Remove(out)
				return &exitError{code: 2, msg: fmt.Sprintf("segmesh: operator %s was created but its credential could not be written to %s: %v; "+
					"revoke it with `segmesh operators revoke %s` and create it again", name, out, err, name)}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "operator %s (role %s) created; credential written to %s (mode 0600): use it with --credentials %s\n",
				name, cmp.Or(resp.GetOperator().GetRole(), role), out, out)
			return nil
		},
	}
	cmd.Flags().StringVar(&role, "role", "", "role of the new credential: admin or viewer")
	cmd.Flags().StringVar(&out, "out", "", "file to write the credential to (default ./operator-NAME.json; never overwritten)")
	_ = cmd.MarkFlagRequired("role")
	return cmd
}

// newCredentials is the credential file for urls (at least one), caPEM and
// token: "controller" is the first URL (what a CLI that predates "controllers"
// reads) and, with several, "controllers" lists them all in order.
func newCredentials(urls []string, caPEM, token string) credentials {
	c := credentials{Controller: urls[0], CAPEM: caPEM, Token: token}
	if len(urls) > 1 {
		c.Controllers = urls
	}
	return c
}

// writeCredentials writes c to f as the JSON of operator.json and closes f.
func writeCredentials(f *os.File, c credentials) error {
	raw, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		_ = f.Close()
		return err
	}
	if _, err := f.Write(append(raw, '\n')); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// operatorJSON is the JSON (and YAML) shape of one credential in `operators list`.
type operatorJSON struct {
	Name      string `json:"name"`
	Role      string `json:"role"` // "admin" or "viewer"
	CreatedAt string `json:"created_at,omitempty"`
	CreatedBy string `json:"created_by,omitempty"`
	RevokedAt string `json:"revoked_at,omitempty"`
	State     string `json:"state"` // "active" or "revoked"
}

func newOperatorsListCmd(g *globalFlags) *cobra.Command {
	return readCmd(&cobra.Command{
		Use:   "list",
		Short: "List operator credentials: name, role, created, by whom, state",
		Args:  cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		resp, err := invoke(g, "listing operators", segmeshv1connect.OperatorServiceClient.ListOperators, &segmeshv1.ListOperatorsRequest{})
		if err != nil {
			return nil, nil, err
		}
		ops := make([]operatorJSON, 0, len(resp.GetOperators()))
		for _, o := range resp.GetOperators() {
			state := "active"
			if o.GetRevokedUnix() != 0 {
				state = "revoked"
			}
			ops = append(ops, operatorJSON{Name: o.GetName(), Role: o.GetRole(), CreatedAt: unixTime(o.GetCreatedUnix()),
				CreatedBy: o.GetCreatedBy(), RevokedAt: unixTime(o.GetRevokedUnix()), State: state})
		}
		return ops, func(w io.Writer) error {
			rows := make([][]string, 0, len(ops))
			for _, o := range ops {
				rows = append(rows, []string{o.Name, o.Role, o.CreatedAt, o.CreatedBy, o.State, o.RevokedAt})
			}
			return writeTable(w, []string{"NAME", "ROLE", "CREATED", "CREATED_BY", "STATE", "REVOKED"}, rows)
		}, nil
	})
}

func newOperatorsRevokeCmd(g *globalFlags) *cobra.Command {
	return argCmd("revoke NAME", "Revoke an operator credential: the controller refuses it from now on", "",
		func(w io.Writer, name string) error {
			if _, err := invoke(g, "revoking operator "+name, segmeshv1connect.OperatorServiceClient.RevokeOperator,
				&segmeshv1.RevokeOperatorRequest{Name: name}); err != nil {
				return err
			}
			_, err := fmt.Fprintf(w, "operator %s revoked: the controller refuses its credential from now on\n", name)
			return err
		})
}
