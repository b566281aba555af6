#!/usr/bin/env bash
# Garage, a real S3-compatible object store, for faultline's tests, benchmarks
# and local fleets: built once from crates.io into a cache outside the repo,
# run as a single node on 127.0.0.1.
#
#   scripts/garage.sh install     build and cache Garage if missing (8.5 min measured
#                                 on 2 busy cores; once); print the binary's path
#   scripts/garage.sh bin         print the cached binary's path (fails if not built)
#   scripts/garage.sh start DIR   start a single-node Garage whose config, data and
#                                 log live in DIR, with an access key and a bucket;
#                                 write DIR/env (the AWS_* variables and
#                                 FAULTLINE_S3_STORE for `--store`). Starting again
#                                 on the same DIR reuses its data, key and ports.
#   scripts/garage.sh stop DIR [--now]
#                                 stop the Garage started in DIR (--now: SIGKILL)
#
# Ports: GARAGE_S3_PORT, GARAGE_RPC_PORT, GARAGE_ADMIN_PORT if set, otherwise
# free ones are picked. GARAGE_CACHE overrides the cache directory.
set -euo pipefail

GARAGE_VERSION=2.5.0
# Only what a single node needs: LMDB metadata, bundled C libraries. The default
# features add SQLite, K2V and Prometheus metrics, which the tests never use.
GARAGE_FEATURES=bundled-libs,lmdb
# (Without HOME, bash's ~ is the user's home from the password database.)
CACHE="${GARAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:-$(echo ~)}/.cache}/faultline/garage-$GARAGE_VERSION}"
BIN="$CACHE/bin/garage"
BUCKET=faultline

die() { echo "garage.sh: $*" >&2; exit 1; }

install() {
  if [ -x "$BIN" ]; then
    echo "$BIN"
    return
  fi
  command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
  echo "garage.sh: building Garage $GARAGE_VERSION into $CACHE (once; 8-25 minutes on 2 cores)" >&2
  local started partial="$CACHE.partial.$$"
  started=$(date +%s)
  rm -rf "$partial"
  # Its own target directory, removed afterwards: never the workspace's
  # (CARGO_TARGET_DIR may point there).
  cargo install --quiet --locked --root "$partial" --target-dir "$partial.target" \
    --no-default-features --features "$GARAGE_FEATURES" "garage@$GARAGE_VERSION" >&2 \
    || { rm -rf "$partial" "$partial.target"; die "building Garage failed (see above)"; }
  rm -rf "$partial.target"
  rm -rf "$CACHE"
  mkdir -p "$(dirname "$CACHE")"
  mv "$partial" "$CACHE"
  echo "garage.sh: built Garage in $(( $(date +%s) - started ))s" >&2
  echo "$BIN"
}

bin() {
  [ -x "$BIN" ] || die "Garage is not built; run: scripts/garage.sh install"
  echo "$BIN"
}

# Whether something listens on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
  local p
  for _ in $(seq 100); do
    p=$(( 20000 + RANDOM % 40000 ))
    listening "$p" || { echo "$p"; return; }
  done
  die "no free port found"
}

hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

start() {
  local dir=$1
  install >/dev/null
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/garage.pid" ] && kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null; then
    die "a Garage started in $dir is running already (pid $(cat "$dir/garage.pid"))"
  fi
  if [ ! -f "$dir/garage.toml" ]; then
    local s3=${GARAGE_S3_PORT:-$(free_port)} rpc=${GARAGE_RPC_PORT:-$(free_port)}
    local admin=${GARAGE_ADMIN_PORT:-$(free_port)}
    cat >"$dir/garage.toml" <<EOF
# Single-node Garage for faultline (scripts/garage.sh); loopback only.
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(hex 32)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
    cat >"$dir/env" <<EOF
AWS_ACCESS_KEY_ID=GK$(hex 12)
AWS_SECRET_ACCESS_KEY=$(hex 32)
AWS_REGION=garage
AWS_ENDPOINT=http://127.0.0.1:$s3
AWS_ALLOW_HTTP=true
FAULTLINE_S3_BUCKET=$BUCKET
FAULTLINE_S3_STORE=s3://$BUCKET/faultline
EOF
  fi
  # shellcheck disable=SC1091
  local key secret
  key=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' "$dir/env")
  secret=$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' "$dir/env")
  # --single-node lays out this one node; --default-bucket creates the key
  # and the bucket (both kept across restarts of the same DIR).
  GARAGE_DEFAULT_ACCESS_KEY=$key GARAGE_DEFAULT_SECRET_KEY=$secret \
    GARAGE_DEFAULT_BUCKET=$BUCKET RUST_LOG=${RUST_LOG:-garage=warn} \
    setsid "$BIN" -c "$dir/garage.toml" server --single-node --default-bucket \
    >>"$dir/garage.log" 2>&1 </dev/null &
  echo $! >"$dir/garage.pid"
  # Ready when the bucket answers through the admin CLI (which also means
  # the layout and key are in place) and the S3 port accepts connections.
  local port
  port=$(sed -n 's|^AWS_ENDPOINT=http://127.0.0.1:||p' "$dir/env")
  for _ in $(seq 300); do
    if ! kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null; then
      tail -20 "$dir/garage.log" >&2
      die "Garage exited during start-up (log: $dir/garage.log)"
    fi
    if listening "$port" && "$BIN" -c "$dir/garage.toml" bucket info "$BUCKET" >/dev/null 2>&1; then
      echo "$dir/env"
      return
    fi
    sleep 0.1
  done
  stop "$dir"
  die "Garage did not become ready in 30s (log: $dir/garage.log)"
}

# Stops the Garage of DIR: SIGTERM, then SIGKILL after 3 s (Garage waits for
# its clients' open connections to close before it exits); with --now,
# SIGKILL at once (its data is crash-safe; tests use it to discard a node).
stop() {
  local dir=$1 now=${2:-} pid
  [ -f "$dir/garage.pid" ] || return 0
  pid=$(cat "$dir/garage.pid")
  if [ "$now" = --now ]; then
    kill -9 "$pid" 2>/dev/null || true
  elif kill "$pid" 2>/dev/null; then
    for _ in $(seq 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  rm -f "$dir/garage.pid"
}

case "${1:-}" in
  install) install ;;
  bin) bin ;;
  start) [ $# = 2 ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ $# -ge 2 ] || die "usage: $0 stop DIR [--now]"; stop "$2" "${3:-}" ;;
  *) die "usage: $0 install | bin | start DIR | stop DIR [--now]" ;;
esac
