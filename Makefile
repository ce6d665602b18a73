# segmesh — build, test and demo. The demo and the tests need root (network namespaces).
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
BIN ?= bin
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: all build test unit e2e demo demo-nat demo-ha lint fmt deps clean unauthload loadgen bench bench-build package

all: build

deps:
	@hack/deps.sh

build:
	$(GO) build -o $(BIN)/ ./cmd/segmesh ./cmd/segmesh-controller ./cmd/segmesh-agent

# Everything: unit tests with the race detector, then the netns end-to-end tests.
test: deps lint unit e2e

# hack/loadgen's test runs the controller binary that build makes.
unit: build
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v '^segmesh/test/')
	cd third_party/wireguard-go && $(GO) test -count=1 -timeout 10m ./device/

e2e:
	$(GO) test -count=1 -timeout 40m -v ./test/...

demo: deps
	hack/demo.sh

# The demo with nodes behind NAT routers (hack/lab -nat: two port-preserving, one
# symmetric, one 1:1): STUN, hole punching and a relay (ops-1) make the whole
# matrix hold; it prints the path each of api-1's peers takes.
demo-nat: deps
	hack/demo.sh -nat

# The demo with three controller replicas (controller-1..3) sharing a real
# three-member etcd cluster (hack/etcd, built from go.mod): the matrix holds,
# then controller-1 is killed with SIGKILL; it prints which replica every agent
# streams from before and after, checks the matrix again and restarts it.
demo-ha: deps
	hack/demo.sh -ha

# Peak controller RSS while 60 unauthenticated clients send 15 MiB bodies (issue 6).
unauthload: build
	$(GO) run ./hack/unauthload -controller-bin $(BIN)/segmesh-controller

# Issue 8: the controller under LOADGEN_AGENTS simulated agents (real enrollment, one
# mutual-TLS stream each, loopback): delivery latency of a policy change (full mesh,
# no peers), a join, an endpoint change, a relabel and a revocation; bytes per agent,
# controller CPU and RSS.
LOADGEN_AGENTS ?= 1000
# make bench's second load generator run, for the rows at 5,000 agents (0: none).
LOADGEN_LARGE_AGENTS ?= 5000
loadgen: build
	$(GO) run ./hack/loadgen -agents $(LOADGEN_AGENTS) -bin $(BIN)/segmesh-controller -json $(BIN)/loadgen.json

# Every figure of issues 7 and 8 on this machine, written to BENCHMARKS.md (root;
# about 20 minutes): every Go benchmark, the netns lab drivers (prefixes end to end,
# TCP throughput overlay/bare wireguard-go, agent memory) and the load generator at
# LOADGEN_AGENTS (and LOADGEN_LARGE_AGENTS, e.g. 5000) agents. BENCHTIME applies to
# the fast Go benchmarks, BENCH_STEPS="go lab loadgen" picks groups; see
# hack/bench.sh and docs/benchmarks.md.
BENCHTIME ?= 5x
BENCH_STEPS ?= go lab loadgen
bench: deps bench-build
	BIN=$(BIN) BENCHTIME=$(BENCHTIME) GO=$(GO) BENCH_STEPS="$(BENCH_STEPS)" LOADGEN_AGENTS=$(LOADGEN_AGENTS) \
		LOADGEN_LARGE_AGENTS=$(LOADGEN_LARGE_AGENTS) hack/bench.sh

bench-build: build
	$(GO) build -o $(BIN)/ ./hack/probe
	$(GO) build -o $(BIN)/wireguard-go golang.zx2c4.com/wireguard

# .deb and .rpm of segmesh-agent (with the segmesh CLI) and segmesh-controller in
# $(BIN)/packages, built with nfpm from packaging/nfpm/*.yaml; static binaries (no
# libc dependency). See docs/packages.md.
NFPM ?= github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2
PKG_VERSION ?= 0.0.0~git$(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
PKG_ARCH ?= $(shell $(GO) env GOARCH)
package:
	$(MAKE) build BIN=$(BIN)/packages/bin CGO_ENABLED=0 GOFLAGS="-trimpath -ldflags=-s"
	printf -- '- semver: %s-1\n  date: %s\n  packager: segmesh maintainers <maintainers@segmesh.invalid>\n  deb:\n    urgency: low\n    distributions: [unstable]\n  changes:\n    - note: Built from commit %s.\n' \
		'$(PKG_VERSION)' "$$(git log -1 --format=%cI 2>/dev/null || date -u +%FT%TZ)" "$$(git rev-parse HEAD 2>/dev/null || echo unknown)" >$(BIN)/packages/changelog.yml
	set -e; for p in segmesh-agent segmesh-controller; do \
		sed 's|@CHANGELOG@|$(abspath $(BIN))/packages/changelog.yml|' packaging/nfpm/$$p.yaml >$(BIN)/packages/$$p.nfpm.yaml; \
		for f in deb rpm; do \
			SEGMESH_VERSION=$(PKG_VERSION) SEGMESH_ARCH=$(PKG_ARCH) SEGMESH_BIN=$(abspath $(BIN))/packages/bin \
				$(GO) run $(NFPM) package --config $(BIN)/packages/$$p.nfpm.yaml --packager $$f --target $(BIN)/packages/; \
		done; \
	done

lint:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

fmt:
	gofmt -w .

clean:
	rm -rf $(BIN)
