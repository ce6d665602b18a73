#!/usr/bin/env bash
# Runs every benchmark of issue 7's table and prints the figures (make bench).
# Needs root and the binaries of `make bench-build` in $BIN. Each step runs even when
# an earlier one failed or missed its target; the exit status is 1 if any did.
# Environment: BIN (default bin), BENCHTIME (fast Go benchmarks, default 5x), GO,
# AGENTMEM_ARGS, PREFIXES_ARGS and THROUGHPUT_ARGS (extra flags, e.g.
# AGENTMEM_ARGS="-idle 6m").
set -uo pipefail
BIN=${BIN:-bin}
BENCHTIME=${BENCHTIME:-5x}
GO=${GO:-go}
failed=()

step() {
  local name=$1
  shift
  echo
  echo "===== $name: $*"
  if ! "$@"; then
    failed+=("$name")
  fi
}

pkg=./agent/dataplane/linux/
step "dataplane benchmarks" "$GO" test -run '^$' -count=1 -timeout 30m -benchtime "$BENCHTIME" \
  -bench '^Benchmark(Apply1000Peers|Reapply1000Peers|Read1000Peers|MembershipChange1000Peers)$' "$pkg"
step "drift restore" "$GO" test -run '^$' -count=1 -timeout 30m -benchtime 3x -bench '^BenchmarkDriftRestore$' "$pkg"
step "200,000 external prefixes" "$GO" test -run '^$' -count=1 -timeout 60m -benchtime 1x \
  -bench '^BenchmarkExternalPrefixes200k$' "$pkg"
# shellcheck disable=SC2086
step "policy with 200,000 external prefixes, end to end" "$GO" run ./hack/prefixes -bin "$BIN" ${PREFIXES_ARGS:-}
# shellcheck disable=SC2086
step "throughput" "$GO" run ./hack/throughput -bin "$BIN" ${THROUGHPUT_ARGS:-}
# shellcheck disable=SC2086
step "agent memory" "$GO" run ./hack/agentmem -bin "$BIN" ${AGENTMEM_ARGS:-}

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench: failed or missed a target: ${failed[*]}" >&2
  exit 1
fi
echo "bench: every step met its target"
