package main

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// auditJSON is the JSON (and YAML) shape of one record in `segmesh audit`.
type auditJSON struct {
	Seq  uint64 `json:"seq"`
	Time string `json:"time"` // RFC 3339 with nanoseconds, UTC
	// Actor is an operator credential name, "node:NAME", "token:ID" or "controller".
	Actor  string `json:"actor"`
	Action string `json:"action"` // e.g. "node.revoke", "policy.apply", "enroll.refused"
	Object string `json:"object"` // e.g. "node:web-1", "token:ab12", "policy:7"
	Result string `json:"result"` // "ok" or "refused: REASON"
	Detail string `json:"detail,omitempty"`
	// PrevHash and Hash are the hex SHA-256 of the previous record and of this one.
	PrevHash string `json:"prev_hash"`
	Hash     string `json:"hash"`
}

// verifyJSON is the shape of `segmesh audit verify -o json`.
type verifyJSON struct {
	OK      bool   `json:"ok"`
	Records uint64 `json:"records"`
	// FirstBadSeq is the first record that was edited or follows a removed one; 0 when ok.
	FirstBadSeq uint64 `json:"first_bad_seq"`
	Problem     string `json:"problem,omitempty"`
	// Head is "SEQ:HASH" of the last record: keep it outside the controller and
	// pass it as --expect-head later.
	Head string `json:"head"`
}

func newAuditCmd(g *globalFlags) *cobra.Command {
	var since, node string
	cmd := readCmd(&cobra.Command{
		Use:   "audit [--since D] [--node NAME] [-o table|json|yaml]",
		Short: "Show the audit log: who changed what, enrollments, refusals; `audit verify` checks its hash chain",
		Long: `Audit prints the controller's audit log, oldest first: token create/revoke,
enrollments and refused enrollments, policy apply/rollback, node revoke, delete,
label and key rotation, operator changes; each with time, actor (operator
credential name, node:NAME or controller), object and result.

--since takes a duration back from now (24h, 90m) or an RFC 3339 time
(2026-12-01T00:00:00Z); --node keeps the records whose actor or object is the node.`,
		Args: cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		req := &segmeshv1.ListAuditRequest{Node: node}
		if since != "" {
			t, err := parseSince(since, time.Now())
			if err != nil {
				return nil, nil, err
			}
			req.SinceUnix = t.Unix()
		}
		resp, err := invoke(g, "reading the audit log", segmeshv1connect.OperatorServiceClient.ListAudit, req)
		if err != nil {
			return nil, nil, err
		}
		records := make([]auditJSON, 0, len(resp.GetRecords()))
		rows := make([][]string, 0, len(resp.GetRecords()))
		for _, r := range resp.GetRecords() {
			t := time.Unix(0, r.GetTimeUnixNano()).UTC()
			records = append(records, auditJSON{Seq: r.GetSeq(), Time: t.Format(time.RFC3339Nano), Actor: r.GetActor(), Action: r.GetAction(),
				Object: r.GetObject(), Result: r.GetResult(), Detail: r.GetDetail(), PrevHash: r.GetPrevHash(), Hash: r.GetHash()})
			// The table shows whole seconds; JSON and YAML keep nanoseconds.
			rows = append(rows, []string{fmt.Sprint(r.GetSeq()), t.Format(time.RFC3339), r.GetActor(), r.GetAction(), r.GetObject(), r.GetResult(), r.GetDetail()})
		}
		return records, func(w io.Writer) error {
			return writeTable(w, []string{"SEQ", "TIME", "ACTOR", "ACTION", "OBJECT", "RESULT", "DETAIL"}, rows)
		}, nil
	})
	cmd.Flags().StringVar(&since, "since", "", "only records from this time on: a duration back from now (24h) or an RFC 3339 time")
	cmd.Flags().StringVar(&node, "node", "", "only records whose actor or object is this node")
	cmd.AddCommand(newAuditVerifyCmd(g))
	return cmd
}

// parseSince reads --since: a positive duration counted back from now, or an
// RFC 3339 time.
func parseSince(s string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil && d > 0 {
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	return time.Time{}, &exitError{code: 2, msg: fmt.Sprintf("segmesh: --since %q: want a duration back from now such as 24h, or an RFC 3339 time such as 2026-12-01T00:00:00Z", s)}
}

func newAuditVerifyCmd(g *globalFlags) *cobra.Command {
	var output *outFormat
	var expect string
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Check the audit log's hash chain; exit 1 and name the first edited or removed record when it is broken",
		Long: `Verify asks the controller to recompute the hash chain of the audit log in its
store: each record holds the SHA-256 of the one before. It prints
"audit log verified: N records, chain intact" and exits 0, or
"audit log tampered: record SEQ: PROBLEM" for the first record that was edited or
follows a removed one, and exits 1.

The chain catches a record edited or removed by someone who did not also
recompute every later hash. It also prints the head (SEQ:HASH of the last
record): keep it outside the controller (a ticket, a SIEM) and pass it later
with --expect-head; the check then also fails when the log up to that record
was rewritten, hashes and all.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := invoke(g, "verifying the audit log", segmeshv1connect.OperatorServiceClient.VerifyAudit, &segmeshv1.VerifyAuditRequest{ExpectHead: expect})
			if err != nil {
				return err
			}
			v := verifyJSON{OK: resp.GetOk(), Records: resp.GetRecords(), FirstBadSeq: resp.GetFirstBadSeq(), Problem: resp.GetProblem(),
				Head: fmt.Sprintf("%d:%s", resp.GetHeadSeq(), resp.GetHeadHash())}
			err = output.write(cmd.OutOrStdout(), v, func(w io.Writer) error {
				if v.OK {
					anchored := ""
					if expect != "" {
						anchored = ", and it holds the expected head " + expect
					}
					_, err := fmt.Fprintf(w, "audit log verified: %d records, chain intact%s\nhead: %s (keep it outside the controller; check against it later with --expect-head)\n", v.Records, anchored, v.Head)
					return err
				}
				_, err := fmt.Fprintf(w, "audit log tampered: record %d: %s\n", v.FirstBadSeq, v.Problem)
				return err
			})
			if err == nil && !v.OK {
				return &exitError{code: 1}
			}
			return err
		},
	}
	output = addOutputFlag(cmd, "")
	cmd.Flags().StringVar(&expect, "expect-head", "", "SEQ:HASH printed by an earlier verify; fail unless record SEQ still has HASH")
	return cmd
}
