package main

import (
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
)

func newTokenCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Manage join tokens"}
	var (
		labels   []string
		ttl      time.Duration
		reusable bool
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
			client, err := operatorClient(g)
			if err != nil {
				return err
			}
			ctx, cancel := callContext()
			defer cancel()
			resp, err := client.CreateToken(ctx, connect.NewRequest(&segmeshv1.CreateTokenRequest{
				Labels: lm, TtlSeconds: int64(ttl / time.Second), Reusable: reusable,
			}))
			if err != nil {
				return callError("creating token", err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), resp.Msg.GetToken())
			return nil
		},
	}
	create.Flags().StringArrayVar(&labels, "label", nil, "label k=v bound to nodes enrolled with this token (repeatable)")
	create.Flags().DurationVar(&ttl, "ttl", 0, "validity, e.g. 1h (default: the controller's --token-ttl)")
	create.Flags().BoolVar(&reusable, "reusable", false, "allow enrolling more than one node with this token")
	cmd.AddCommand(create)
	return cmd
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
