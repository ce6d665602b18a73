// Package policy parses, validates and compiles segmesh policy files. It is pure:
// standard library, YAML and net/netip only; no kernel, network or agent/controller code.
package policy
