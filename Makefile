# faultline: the two commands of the README, and what they need.
#
#   make demo   generate a snapshot, serve it, read it back through faultline
#   make test   formatting, clippy (warnings are errors), every test, the deploy/ checks
#   make bench  every benchmark against its baselines (~15-30 min; bench-quick: < 5 min),
#               report in bench-out/ (BENCHMARKS.md, report.json, plots)
#
# The build needs libclang (bindgen, for the userfaultfd crate); the benchmark
# plots need a TrueType font (DejaVu), and `make bench` QEMU (its postcopy
# migration is a baseline; `make test` does not install it). Run as root,
# this Makefile installs what is missing with apt-get; otherwise it prints
# the command to run.

CARGO ?= cargo
APT_PACKAGES := libclang-dev fonts-dejavu-core
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

.PHONY: all deps bench-deps build demo test fmt clippy unit deploy-check bench bench-quick clean

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

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p faultline-client --all-targets --features vm-memory -- -D warnings

# Kernel-dependent tests fail where this machine lacks what they need;
# FAULTLINE_ALLOW_SKIP=1 lets them skip instead. Each skip appends a line to
# SKIP_LOG, and the count is printed at the end.
SKIP_LOG := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/skipped-tests.log
export FAULTLINE_SKIP_LOG := $(SKIP_LOG)

unit: deps
	@mkdir -p $(dir $(SKIP_LOG)) && rm -f $(SKIP_LOG)
	$(CARGO) test --workspace
	$(CARGO) test -p faultline-client --features vm-memory --lib
	$(CARGO) test -p faultline-client --features vm-memory --doc
	@n=$$(cat $(SKIP_LOG) 2>/dev/null | wc -l); \
	echo "tests skipped for lack of a kernel facility: $$n"; \
	if [ "$$n" -gt 0 ]; then sed 's/^/  skipped: /' $(SKIP_LOG); fi

# deploy/: hadolint, kubernetes-validate, compose config, shellcheck, systemd-analyze, and the
# files' flags, environment and probes against the built binaries (deploy/README.md).
deploy-check: deps
	./scripts/check-deploy.sh

test: deps fmt clippy unit deploy-check

bench: build bench-deps
	./target/release/faultline-bench all --out bench-out

bench-quick: build bench-deps
	./target/release/faultline-bench all --quick --out bench-out

clean:
	$(CARGO) clean
	rm -rf demo-data bench-out
