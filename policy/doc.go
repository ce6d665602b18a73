// Package policy parses, validates and compiles segmesh policy files, and
// evaluates them for the people who write them: the tests section (RunTests),
// why a packet is allowed or denied (Explain), what a change does (Diff), on a
// real inventory (ParseInventory, the NODES.yaml format) or on one derived from
// the policy (PrototypeInventory), what selects no node of an inventory
// (Warnings), which segments may reach which (Graph), and which relay nodes a
// pair of nodes may use (Program.RelaysFor). Label keys and values have one syntax everywhere, defined here
// (LabelSyntax, CheckLabels) and enforced in selectors, inventories and by the
// controller. docs/policy.md is the reference of the format and its semantics.
//
// It is pure: standard library, YAML and net/netip only; no kernel, network or
// agent/controller code.
package policy
