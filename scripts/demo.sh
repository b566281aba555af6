#!/usr/bin/env bash
# The faultline demo (`make demo`): generate a guest memory image, import it
# as a snapshot, serve it over gRPC on loopback, and restore it lazily through
# userfaultfd into several kinds of guest memory, verifying every touched
# page against the manifest's digests; finally restore a KVM micro-VM whose
# vCPU faults its memory in through faultline.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
DATA=${FAULTLINE_DEMO_DIR:-demo-data}
PORT=${FAULTLINE_DEMO_PORT:-7171}
METRICS_PORT=${FAULTLINE_DEMO_METRICS_PORT:-7172}
SIZE=${FAULTLINE_DEMO_SIZE:-256M}
SERVER_PID=
# Client logs: warnings only (the summaries say the rest).
export RUST_LOG=${RUST_LOG:-warn}

cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null; true; }
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

rm -rf "$DATA" && mkdir -p "$DATA"

step "1. A guest memory image of $SIZE (zero pages, text, random data), like a Firecracker memory file"
"$BIN/faultline-bench" gen --size "$SIZE" --out "$DATA/guest.mem"

step "2. Import it as snapshot 'demo' (zero map, CRC32C per page, sparse copy)"
"$BIN/faultline-server" import --store "$DATA/store" --name demo --mem-file "$DATA/guest.mem"
"$BIN/faultline-server" inspect --store "$DATA/store" --name demo
du -h --apparent-size "$DATA/guest.mem" | sed 's/^/image on disk (apparent): /'
du -h "$DATA/store/demo/memory" | sed 's/^/snapshot on disk (sparse): /'

step "3. Serve it on 127.0.0.1:$PORT (metrics on 127.0.0.1:$METRICS_PORT)"
RUST_LOG=info "$BIN/faultline-server" serve --store "$DATA/store" --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" 2>"$DATA/server.log" &
SERVER_PID=$!
for _ in $(seq 50); do
  grep -q "serving" "$DATA/server.log" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$DATA/server.log"; echo "the server did not start (is port $PORT taken? set FAULTLINE_DEMO_PORT)"; exit 1; }
  sleep 0.1
done
cat "$DATA/server.log"

step "4. What this host's kernel offers faultline (faultline probe)"
"$BIN/faultline" probe

step "5. Lazy restore into anonymous memory: 4 threads touch every page while the prefetcher streams the rest"
"$BIN/faultline" restore --server "http://127.0.0.1:$PORT" --snapshot demo --backing anon \
  --touch all --threads 4 --prefetch all --verify

step "6. Lazy restore into a shmem memfd (UFFDIO_CONTINUE), demand faults only, 5000 random pages"
"$BIN/faultline" restore --server "http://127.0.0.1:$PORT" --snapshot demo --backing shmem \
  --touch random:5000 --prefetch none --verify

step "7. guest_memfd: this kernel offers no lazy method, so faultline fills it before the guest runs, and says so"
if [ ! -w /dev/kvm ]; then echo "skipped: /dev/kvm is not available here (guest_memfd is created through KVM)"; else
# Some hypervisors' KVM has no guest_memfd at all (KVM_CAP_GUEST_MEMFD = 0): faultline then
# refuses the backing and names the ones to use, which is this step's answer on such a host.
status=0
out=$("$BIN/faultline" restore --server "http://127.0.0.1:$PORT" --snapshot demo \
  --backing guest-memfd --touch random:1000 --verify 2>&1) || status=$?
echo "$out"
if [ "$status" -ne 0 ]; then
  grep -q "KVM_CAP_GUEST_MEMFD = 0" <<<"$out" || exit "$status"
  echo "(this host's KVM has no guest_memfd: the refusal above is what a user here is told)"
fi
fi

step "8. Read the whole snapshot back into a file, every page verified"
"$BIN/faultline" fetch --server "http://127.0.0.1:$PORT" --snapshot demo --out "$DATA/fetched.mem"
cmp "$DATA/guest.mem" "$DATA/fetched.mem" && echo "byte for byte identical to the original image"

step "9. What the server's metrics say"
exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT"
printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
grep -E '^faultline_server_(pages_served|zero_pages_skipped|bytes_served)_total' <&3 || true
exec 3>&-

step "10. A KVM micro-VM restored through faultline: snapshot, import, in-process server, pager on a shmem memfd; the vCPU's own accesses fault 4096 random pages in"
if [ -w /dev/kvm ]; then
  "$BIN/faultline-bench" vm --backing shmem --size 64M --walk random
else
  echo "skipped: /dev/kvm is not available here"
fi

step "done; files are in $DATA/"
