#!/usr/bin/env bash
# Runs every benchmark of issues 7 and 8 and writes BENCHMARKS.md (make bench):
# the Go benchmarks of every package that has some, the netns lab drivers
# (hack/prefixes, hack/throughput, hack/agentmem) and the load generator
# (hack/loadgen) at LOADGEN_AGENTS simulated agents, optionally once more at
# LOADGEN_LARGE_AGENTS; then hack/benchreport renders the report from their
# outputs in $OUT. Needs root and the binaries of `make bench-build` in $BIN.
# Each step runs even when an earlier one failed or missed its target; the exit
# status is 1 if any did (the report is written anyway, with "not measured" and
# the reason for what is missing).
#
# Environment:
#   BIN (default bin), GO, BENCHTIME (fast Go benchmarks, default 5x)
#   OUT (raw outputs, default $BIN/bench; emptied first), REPORT (default BENCHMARKS.md)
#   BENCH_STEPS: which groups run, default "go lab loadgen"
#   LOADGEN_AGENTS (default 1000), LOADGEN_ARGS (extra flags, e.g. "-scenario policy,join")
#   LOADGEN_LARGE_AGENTS (default 5000; 0 skips the rows at 5,000 agents)
#   LOADGEN_LARGE_SCENARIOS (default mesh,policy,join,nopeers)
#   AGENTMEM_ARGS, PREFIXES_ARGS and THROUGHPUT_ARGS (extra flags, e.g. AGENTMEM_ARGS="-idle 6m")
set -uo pipefail
BIN=${BIN:-bin}
BENCHTIME=${BENCHTIME:-5x}
GO=${GO:-go}
OUT=${OUT:-$BIN/bench}
REPORT=${REPORT:-BENCHMARKS.md}
BENCH_STEPS=${BENCH_STEPS:-go lab loadgen}
LOADGEN_AGENTS=${LOADGEN_AGENTS:-1000}
LOADGEN_LARGE_AGENTS=${LOADGEN_LARGE_AGENTS:-5000}
LOADGEN_LARGE_SCENARIOS=${LOADGEN_LARGE_SCENARIOS:-mesh,policy,join,nopeers}
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

wants() { [[ " $BENCH_STEPS " == *" $1 "* ]]; }

# gobench runs go test with the given flags and appends its output to
# $OUT/gotest.txt, after "command:" and "date:" lines that hack/benchreport reads.
gobench() {
  {
    echo "command: go test $*"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >>"$OUT/gotest.txt"
  "$GO" test "$@" 2>&1 | tee -a "$OUT/gotest.txt"
}

rm -rf "$OUT"
mkdir -p "$OUT"

if wants go; then
  # Every package with a Go benchmark (third_party and the e2e tests aside).
  mapfile -t pkgs < <(grep -rl --include='*_test.go' '^func Benchmark' . --exclude-dir=third_party --exclude-dir=test --exclude-dir=.git |
    xargs -n1 dirname | sort -u | sed 's|$|/|')
  slow='^Benchmark(ExternalPrefixes200k|DriftRestore)$'
  step "Go benchmarks" gobench -run '^$' -count=1 -timeout 30m -benchmem -benchtime "$BENCHTIME" -bench . -skip "$slow" "${pkgs[@]}"
  dp=./agent/dataplane/linux/
  step "drift restore" gobench -run '^$' -count=1 -timeout 30m -benchmem -benchtime 3x -bench '^BenchmarkDriftRestore$' "$dp"
  step "200,000 external prefixes" gobench -run '^$' -count=1 -timeout 60m -benchmem -benchtime 1x -bench '^BenchmarkExternalPrefixes200k$' "$dp"
fi
if wants lab; then
  # shellcheck disable=SC2086
  step "policy with 200,000 external prefixes, end to end" "$GO" run ./hack/prefixes -bin "$BIN" -json "$OUT/prefixes.json" ${PREFIXES_ARGS:-}
  # shellcheck disable=SC2086
  step "throughput" "$GO" run ./hack/throughput -bin "$BIN" -json "$OUT/throughput.json" ${THROUGHPUT_ARGS:-}
  # shellcheck disable=SC2086
  step "agent memory" "$GO" run ./hack/agentmem -bin "$BIN" -json "$OUT/agentmem.json" ${AGENTMEM_ARGS:-}
fi
if wants loadgen; then
  # shellcheck disable=SC2086
  step "load generator, $LOADGEN_AGENTS agents" "$GO" run ./hack/loadgen -agents "$LOADGEN_AGENTS" -bin "$BIN/segmesh-controller" \
    -json "$OUT/loadgen-$LOADGEN_AGENTS.json" ${LOADGEN_ARGS:-}
  if [ "$LOADGEN_LARGE_AGENTS" -gt 0 ]; then
    step "load generator, $LOADGEN_LARGE_AGENTS agents" "$GO" run ./hack/loadgen -agents "$LOADGEN_LARGE_AGENTS" -bin "$BIN/segmesh-controller" \
      -scenario "$LOADGEN_LARGE_SCENARIOS" -verify 20 -timeout 15m -json "$OUT/loadgen-$LOADGEN_LARGE_AGENTS.json"
  fi
fi

figures=()
for f in "$OUT"/*.json; do
  [ -e "$f" ] && figures+=(-figures "$f")
done
step "report" "$GO" run ./hack/benchreport -out "$REPORT" -gotest "$OUT/gotest.txt" "${figures[@]}"

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench: failed or missed a target: ${failed[*]} (see $REPORT)" >&2
  exit 1
fi
echo "bench: every step ran; $REPORT compares every figure with its target"
