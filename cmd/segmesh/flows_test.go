package main

import (
	"encoding/json"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/goccy/go-yaml"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// withDeniedFlows makes f answer ListDeniedFlows with two records: web-1 -> db-1
// tcp/22 dropped by db-1, and an unknown address to db-1 (no closest rule):
// only one end is a node.
func withDeniedFlows(f *fakeController) *fakeController {
	f.reply(segmeshv1connect.OperatorServiceListDeniedFlowsProcedure, connect.NewResponse(&segmeshv1.ListDeniedFlowsResponse{Dropped: 7, Flows: []*segmeshv1.DeniedFlowRecord{
		{Node: "db-1", Flow: &segmeshv1.DeniedFlow{Direction: "in", Source: "100.64.0.2", Destination: "100.64.0.3", Protocol: "tcp", Port: 22,
			Packets: 4, Bytes: 240, FirstSeenUnix: t1, LastSeenUnix: t2},
			SourceNode: "web-1", DestinationNode: "db-1", SourceSegments: []string{"prod", "web"}, DestinationSegments: []string{"db"}, Revision: 3,
			Closest: []*segmeshv1.ClosestRule{
				{Rule: "web-to-db", Position: "policy.yaml:8:5", Matches: []string{"from", "to"}, Mismatches: []string{"packet: tcp/22 is not in tcp/5432"}},
				{Rule: "ops-admin", Position: "policy.yaml:12:5", Matches: []string{"to", "packet"}, Mismatches: []string{"from: web-1 is not in ops"}},
			}},
		{Node: "db-1", Flow: &segmeshv1.DeniedFlow{Direction: "in", Source: "fd5e:6d65:7368::99", Destination: "fd5e:6d65:7368::3", Protocol: "icmpv6",
			Packets: 1, FirstSeenUnix: t1, LastSeenUnix: t1},
			DestinationNode: "db-1", DestinationSegments: []string{"db"}, Revision: 3},
	}}))
	return f
}

func TestFlowsDeniedTable(t *testing.T) {
	f := withDeniedFlows(newFakeController(t))
	out, errOut, code := f.run("flows", "--denied")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	want := [][]string{
		{"LAST_SEEN", "NODE", "DIR", "SOURCE", "DESTINATION", "PROTO/PORT", "PACKETS", "CLOSEST_RULE"},
		{"2026-12-01T00:53:20Z", "db-1", "in", "web-1[prod,web]", "db-1[db]", "tcp/22", "4", "web-to-db", "at", "policy.yaml:8:5:", "packet:", "tcp/22", "is", "not", "in", "tcp/5432"},
		{"2026-11-30T00:53:20Z", "db-1", "in", "fd5e:6d65:7368::99", "db-1[db]", "icmpv6", "1", "-"},
	}
	var got [][]string
	for _, l := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		got = append(got, strings.Fields(l))
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("table (-want +got):\n%s\n%s", d, out)
	}
}

func TestFlowsDeniedJSONAndYAML(t *testing.T) {
	f := withDeniedFlows(newFakeController(t))
	out, errOut, code := f.run("flows", "--denied", "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var doc flowsJSON
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := flowsJSON{Dropped: 7, Flows: []deniedFlowJSON{
		{LastSeen: "2026-12-01T00:53:20Z", FirstSeen: "2026-11-30T00:53:20Z", Node: "db-1", Direction: "in",
			Source: "100.64.0.2", SourceNode: "web-1", SourceSegments: []string{"prod", "web"},
			Destination: "100.64.0.3", DestinationNode: "db-1", DestinationSegments: []string{"db"},
			Protocol: "tcp", Port: 22, Packets: 4, Bytes: 240, Revision: 3, Closest: []closestRuleJSON{
				{Rule: "web-to-db", Position: "policy.yaml:8:5", Matches: []string{"from", "to"}, Mismatches: []string{"packet: tcp/22 is not in tcp/5432"}},
				{Rule: "ops-admin", Position: "policy.yaml:12:5", Matches: []string{"to", "packet"}, Mismatches: []string{"from: web-1 is not in ops"}},
			}},
		{LastSeen: "2026-11-30T00:53:20Z", FirstSeen: "2026-11-30T00:53:20Z", Node: "db-1", Direction: "in",
			Source: "fd5e:6d65:7368::99", SourceSegments: []string{},
			Destination: "fd5e:6d65:7368::3", DestinationNode: "db-1", DestinationSegments: []string{"db"},
			Protocol: "icmpv6", Packets: 1, Revision: 3, Closest: []closestRuleJSON{}},
	}}
	if d := cmp.Diff(want, doc); d != "" {
		t.Errorf("json (-want +got):\n%s", d)
	}
	// Empty lists are [] (not null) so that scripts can iterate.
	if !strings.Contains(out, `"closest": []`) || !strings.Contains(out, `"source_segments": []`) {
		t.Errorf("json lacks empty lists:\n%s", out)
	}
	yout, errOut, code := f.run("flows", "--denied", "-o", "yaml")
	if code != 0 {
		t.Fatalf("yaml: exit %d: %s", code, errOut)
	}
	var ydoc flowsJSON
	raw, err := yaml.YAMLToJSON([]byte(yout))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &ydoc); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(doc, ydoc); d != "" {
		t.Errorf("yaml differs from json (-json +yaml):\n%s", d)
	}
}

func TestFlowsDeniedRequest(t *testing.T) {
	tests := []struct {
		args []string
		want *segmeshv1.ListDeniedFlowsRequest
	}{
		{nil, &segmeshv1.ListDeniedFlowsRequest{}},
		{[]string{"--node", "db-1", "--limit", "5", "--since", "2026-12-01T00:00:00Z"}, &segmeshv1.ListDeniedFlowsRequest{Node: "db-1", Limit: 5, SinceUnix: 1796083200}},
	}
	for _, tt := range tests {
		f := withDeniedFlows(newFakeController(t))
		if _, errOut, code := f.run(append([]string{"flows", "--denied", "-o", "json"}, tt.args...)...); code != 0 {
			t.Fatalf("%v: exit %d: %s", tt.args, code, errOut)
		}
		reqs := f.requests(segmeshv1connect.OperatorServiceListDeniedFlowsProcedure)
		if len(reqs) != 1 {
			t.Fatalf("%v: %d requests, want 1", tt.args, len(reqs))
		}
		if d := cmp.Diff(tt.want, reqs[0], protocmp.Transform()); d != "" {
			t.Errorf("%v: request (-want +got):\n%s", tt.args, d)
		}
	}
	// A duration counts back from now.
	f := withDeniedFlows(newFakeController(t))
	if _, errOut, code := f.run("flows", "--denied", "--since", "10m"); code != 0 {
		t.Fatalf("--since 10m: exit %d: %s", code, errOut)
	}
	req := f.requests(segmeshv1connect.OperatorServiceListDeniedFlowsProcedure)[0].(*segmeshv1.ListDeniedFlowsRequest)
	if req.SinceUnix < t2 {
		t.Errorf("--since 10m sent since_unix %d, want about 10 minutes ago", req.SinceUnix)
	}
}

func TestFlowsUsageErrors(t *testing.T) {
	f := withDeniedFlows(newFakeController(t))
	for _, tt := range []struct {
		args []string
		msg  string
	}{
		{[]string{"flows"}, "add --denied"},
		{[]string{"flows", "--denied", "--since", "yesterday"}, "--since"},
		{[]string{"flows", "--denied", "--limit", "5000"}, "at most 1000"},
	} {
		_, msg, code := f.run(tt.args...)
		if code != 2 || !strings.Contains(msg, tt.msg) {
			t.Errorf("%v: exit %d, %q; want exit 2 mentioning %q", tt.args, code, msg, tt.msg)
		}
	}
	if n := len(f.requests(segmeshv1connect.OperatorServiceListDeniedFlowsProcedure)); n != 0 {
		t.Errorf("usage errors sent %d requests, want none", n)
	}
}
