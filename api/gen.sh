#!/usr/bin/env bash
# Regenerates the Go code for the wire API. Needs protoc, protoc-gen-go and
# protoc-gen-connect-go on PATH; the output is committed so builds need none of them.
set -euo pipefail
cd "$(dirname "$0")"
protoc -I . \
  --go_out=. --go_opt=module=segmesh/api \
  --connect-go_out=. --connect-go_opt=module=segmesh/api \
  segmesh/v1/segmesh.proto
