# faultline: the two commands of the README, and what they need.
#
#   make demo   generate a snapshot, serve it, read it back through faultline
#   make test   formatting, clippy (warnings are errors), every test (building
#               Garage, the S3 server the object-store tests run against, once),
#               the deploy/ checks, a bounded fuzz run
#   make fuzz   the fuzz targets (fuzz/), FUZZ_SECONDS each, on stable Rust
#   make bench  every benchmark against its baselines (~15-30 min; bench-quick: < 5 min),
#               report in bench-out/ (BENCHMARKS.md, report.json, plots)
#
# The build needs libclang (bindgen, for the userfaultfd crate); the benchmark
# plots need a TrueType font (DejaVu); the TLS tests talk to the server with a
# stock gRPC client (Python grpcio); `make bench` needs QEMU (its postcopy
# migration is a baseline; `make test` does not install it). Run as root,
# this Makefile installs what is missing with apt-get; otherwise it prints
# the command to run.

CARGO ?= cargo
APT_PACKAGES := libclang-dev fonts-dejavu-core python3-grpcio
# Only for `make bench`: QEMU, whose postcopy migration is the restore scenario's baseline.
BENCH_APT_PACKAGES := qemu-system-x86

# $(call apt_install,PACKAGES,APT-OPTIONS): installs the missing ones as root, else says how.
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing >/dev/null || exit 1; \
	  else \
	    echo "missing packages:$$missing"; \
	    echo "run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi
endef

.PHONY: all deps bench-deps build demo test fmt clippy unit garage deploy-check fuzz bench bench-quick clean

all: build

deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }
	$(call apt_install,$(APT_PACKAGES),)

bench-deps: deps
	$(call apt_install,$(BENCH_APT_PACKAGES),--no-install-recommends)

build: deps
	$(CARGO) build --release --workspace

demo: build
	./scripts/demo.sh

fmt:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --all --check --manifest-path fuzz/Cargo.toml

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p faultline-client --all-targets --features vm-memory -- -D warnings

# Garage, the real S3 server of the object-store tests (server/tests/s3_*.rs):
# built once from crates.io into ~/.cache/faultline (about 8-25 minutes on 2
# cores), reused afterwards; each test starts its own single node on 127.0.0.1.
garage:
	./scripts/garage.sh install >/dev/null

# Kernel-dependent tests fail where this machine lacks what they need;
# FAULTLINE_ALLOW_SKIP=1 lets them skip instead. Each skip appends a line to
# SKIP_LOG, and the count is printed at the end. So does each test narrowed to
# what this host can do (a KVM without guest_memfd: the test checks the
# refusal instead), which passes: the host, not the project, lacks it.
SKIP_LOG := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/skipped-tests.log
export FAULTLINE_SKIP_LOG := $(SKIP_LOG)

unit: deps garage
	@mkdir -p $(dir $(SKIP_LOG)) && rm -f $(SKIP_LOG)
	$(CARGO) test --workspace
	$(CARGO) test -p faultline-client --features vm-memory --lib
	$(CARGO) test -p faultline-client --features vm-memory --doc
	@n=$$(cat $(SKIP_LOG) 2>/dev/null | wc -l); \
	echo "tests skipped or narrowed for lack of a kernel facility: $$n"; \
	if [ "$$n" -gt 0 ]; then sed 's/^/  /' $(SKIP_LOG); fi

# Fuzzing on stable Rust: libFuzzer (from the libfuzzer-sys crate) with the
# coverage instrumentation cargo-fuzz would add (`cargo fuzz run -s none`
# does the same where cargo-fuzz is installed). Each target starts from its
# corpus in fuzz/corpus/ (kept small, in the repo) and writes what it finds
# to a scratch directory; a crash leaves its input in fuzz/artifacts/ and
# fails the run.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := batch_decode manifest handshake frame_decode
FUZZ_HOST := $(shell rustc -vV 2>/dev/null | sed -n 's/host: //p')
FUZZ_TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/fuzz/target)
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks

fuzz: deps
	cd fuzz && RUSTFLAGS="$(FUZZ_RUSTFLAGS)" $(CARGO) build --release --bins \
	  --target $(FUZZ_HOST) --target-dir $(FUZZ_TARGET_DIR)
	@for t in $(FUZZ_TARGETS); do \
	  scratch=$$(mktemp -d); mkdir -p fuzz/artifacts/$$t; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS)s"; \
	  $(FUZZ_TARGET_DIR)/$(FUZZ_HOST)/release/$$t -max_total_time=$(FUZZ_SECONDS) \
	    -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 \
	    -artifact_prefix=fuzz/artifacts/$$t/ $$scratch fuzz/corpus/$$t >$$scratch.log 2>&1; \
	  status=$$?; \
	  if [ $$status -ne 0 ]; then tail -n 40 $$scratch.log; else grep -E "DONE|^Done" $$scratch.log; fi; \
	  rm -rf $$scratch $$scratch.log; \
	  if [ $$status -ne 0 ]; then echo "fuzz target $$t failed; its input is in fuzz/artifacts/$$t/"; exit 1; fi; \
	done

# deploy/: hadolint, kubernetes-validate, compose config, shellcheck, systemd-analyze, and the
# files' flags, environment and probes against the built binaries (deploy/README.md).
deploy-check: deps
	./scripts/check-deploy.sh

test: deps fmt clippy unit deploy-check fuzz

bench: build bench-deps
	./target/release/faultline-bench all --out bench-out

bench-quick: build bench-deps
	./target/release/faultline-bench all --quick --out bench-out

clean:
	$(CARGO) clean
	rm -rf demo-data bench-out
