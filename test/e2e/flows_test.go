package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"segmesh/test/lab"
)

// deniedFlowsDoc is the part of `segmesh flows --denied -o json` the test reads.
type deniedFlowsDoc struct {
	Flows []struct {
		Node                string   `json:"node"`
		Direction           string   `json:"direction"`
		Source              string   `json:"source"`
		SourceNode          string   `json:"source_node"`
		SourceSegments      []string `json:"source_segments"`
		Destination         string   `json:"destination"`
		DestinationNode     string   `json:"destination_node"`
		DestinationSegments []string `json:"destination_segments"`
		Protocol            string   `json:"protocol"`
		Port                uint32   `json:"port"`
		Packets             uint64   `json:"packets"`
		Revision            uint64   `json:"revision"`
		Closest             []struct {
			Rule       string   `json:"rule"`
			Position   string   `json:"position"`
			Matches    []string `json:"matches"`
			Mismatches []string `json:"mismatches"`
		} `json:"closest"`
	} `json:"flows"`
}

// flowsReportTimeout bounds the wait for a denied probe to reach the controller:
// the agent reads its kernel's denied-flow sets and reports them at its next
// periodic report (every --resync, 10 s by default).
const flowsReportTimeout = 45 * time.Second

// TestDeniedFlows probes web-1 -> db-1 tcp/5432, which the example policy
// denies (only api reaches db on 5432), and checks that `segmesh flows --denied`
// lists it: dropped by web-1's egress filter (web-1 and db-1 are not even
// peers), both ends named with their segments, and rule api-to-db as the
// closest rule, which matches the destination and the packet but not the source.
func TestDeniedFlows(t *testing.T) {
	m, st, _ := upExample(t)
	ctx := context.Background()
	dst, ok := st.Node("db-1").Addr(4)
	if !ok {
		t.Fatal("db-1 has no IPv4 overlay address in status")
	}
	web1 := m.Node("web-1").Host
	probe := func() {
		pctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
		defer cancel()
		if c, err := web1.DialTCP(pctx, netip.AddrPortFrom(dst, 5432)); err == nil {
			c.Close()
			t.Fatalf("web-1 reached db-1 tcp/5432, which the example policy denies")
		}
	}
	probe()
	var found string
	err := lab.WaitFor(ctx, flowsReportTimeout, func(ctx context.Context) (bool, error) {
		out, err := m.CLI(ctx, "flows", "--denied", "--node", "web-1", "--since", "10m", "-o", "json")
		if err != nil {
			return false, err
		}
		var doc deniedFlowsDoc
		if err := json.Unmarshal([]byte(out), &doc); err != nil {
			return false, lab.Abort(fmt.Errorf("decoding flows --denied -o json: %w\n%s", err, out))
		}
		for _, f := range doc.Flows {
			if f.Destination != dst.String() || f.Protocol != "tcp" || f.Port != 5432 {
				continue
			}
			var problems []string
			check := func(what, got, want string) {
				if got != want {
					problems = append(problems, fmt.Sprintf("%s %q, want %q", what, got, want))
				}
			}
			check("node", f.Node, "web-1")
			check("direction", f.Direction, "out")
			check("source node", f.SourceNode, "web-1")
			check("source segments", strings.Join(f.SourceSegments, ","), "web")
			check("destination node", f.DestinationNode, "db-1")
			check("destination segments", strings.Join(f.DestinationSegments, ","), "db")
			if f.Packets == 0 || f.Revision != st.PolicyRevision {
				problems = append(problems, fmt.Sprintf("packets %d revision %d, want packets and revision %d", f.Packets, f.Revision, st.PolicyRevision))
			}
			if len(f.Closest) == 0 {
				problems = append(problems, "no closest rule")
			} else {
				c := f.Closest[0]
				check("closest rule", c.Rule, "api-to-db")
				// The CLI sends the file's path as the policy's file name.
				check("closest rule position", c.Position, examplePolicy()+":40:5")
				check("closest rule matches", strings.Join(c.Matches, ","), "to,packet")
				check("closest rule mismatches", strings.Join(c.Mismatches, "; "), "from: web-1 is not in api")
			}
			if len(problems) > 0 {
				return false, lab.Abort(fmt.Errorf("denied flow web-1 -> db-1 tcp/5432 listed wrong: %s\n%s", strings.Join(problems, "; "), out))
			}
			found = out
			return true, nil
		}
		probe() // the agent may have read its sets before the first probe's packets
		return false, fmt.Errorf("no denied flow to %s tcp/5432 listed yet:\n%s", dst, out)
	})
	if err != nil {
		t.Fatal(err)
	}
	table, err := m.CLI(ctx, "flows", "--denied")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table, "web-1[web]") || !strings.Contains(table, "api-to-db at "+examplePolicy()+":40:5: from: web-1 is not in api") {
		t.Errorf("flows --denied table lacks the probe's flow:\n%s", table)
	}
	t.Logf("segmesh flows --denied -o json:\n%s\nsegmesh flows --denied:\n%s", found, table)
}
