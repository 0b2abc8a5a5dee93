#!/usr/bin/env bash
# The README's first set-up command on a machine without PMDK: the main job
# builds and runs its embedded default, serves data over NBD, refuses a
# mode 1 device with an error that says what to install (and changes
# nothing), shuts down cleanly on SIGTERM, and reads its data back after a
# restart. .ci/run calls it before PMDK is installed, with WB_REQUIRE_BARE=1.
#
#   bash test/bare-host.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ldconfig -p | grep -c 'libpmem2\.so' >/dev/null; then
    if [ -n "${WB_REQUIRE_BARE:-}" ]; then
        echo "bare-host: libpmem2 is installed ($(ldconfig -p | grep 'libpmem2\.so' | head -1 | sed 's/.*=> //'));" \
            "this check needs a machine without PMDK (apt-get purge libpmem2)" >&2
        exit 1
    fi
    echo "SKIPPED: bare-host: libpmem2 is installed here (the check is for a machine without PMDK)"
    exit 0
fi
for tool in qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "bare-host: $tool is needed (apt-get install qemu-utils python3)" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wb-bare.XXXXXX")
HOST_PID=""
cleanup() {
    [ -n "$HOST_PID" ] && kill -9 "$HOST_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
URI=nbd://127.0.0.1:10809/wb0
RPC_SOCK=/var/tmp/writeboost.sock

(cd "$ROOT" && cargo build --release --bin writeboost)
if ldd "$ROOT/target/release/writeboost" | grep -q pmem; then
    echo "bare-host: the host binary links PMDK; mode 0 must run without it" >&2
    exit 1
fi

# start_host — the README's command, from an empty directory.
start_host() {
    (cd "$WORK" && exec cargo run -q --manifest-path "$ROOT/Cargo.toml" --release --bin writeboost) \
        >"$WORK/host.log" 2>&1 &
    HOST_PID=$!
    local i
    for i in $(seq 1 300); do
        grep -q "writeboost: ready" "$WORK/host.log" 2>/dev/null && return 0
        kill -0 "$HOST_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "bare-host: the host did not start; its log:" >&2
    cat "$WORK/host.log" >&2
    exit 1
}

stop_host() {
    kill -TERM "$HOST_PID"
    local rc=0
    wait "$HOST_PID" || rc=$?
    HOST_PID=""
    if [ "$rc" != 0 ]; then
        echo "bare-host: the host exited with status $rc after SIGTERM; its log:" >&2
        cat "$WORK/host.log" >&2
        exit 1
    fi
}

qemu_io() {
    local out
    out=$(qemu-io -f raw "$URI" "$@" 2>&1) || { echo "$out" >&2; exit 1; }
    if grep -qE "failed|Pattern verification" <<<"$out"; then
        echo "bare-host: qemu-io: $out" >&2
        exit 1
    fi
}

start_host
qemu_io -c 'write -P 0xab 0 1M' -c 'flush' -c 'read -P 0xab 0 1M'

# Mode 1 without PMDK: a typed refusal naming the package, and nothing made.
python3 - "$RPC_SOCK" "$WORK/pool" <<'PY'
import json, socket, sys
sock, pool = sys.argv[1], sys.argv[2]
open(pool, "wb").truncate(16 << 20)
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
f = s.makefile("r")
def call(method, params=None, n=[0]):
    n[0] += 1
    req = {"jsonrpc": "2.0", "id": n[0], "method": method}
    if params is not None:
        req["params"] = params
    s.sendall(json.dumps(req).encode() + b"\n")
    return json.loads(f.readline())
for name, blocks in (("Cache1", 16384), ("Back1", 65536)):
    r = call("bdev_malloc_create", {"name": name, "num_blocks": blocks, "block_size": 4096})
    assert r.get("result") == name, r
r = call("bdev_writeboost_create", {"name": "wb1", "cache_bdev": "Cache1",
                                    "backing_bdev": "Back1", "mode": 1, "pmem_path": pool})
msg = r.get("error", {}).get("message", "")
assert "apt-get install libpmem2" in msg, f"mode 1 without PMDK was not refused clearly: {r}"
names = [b["name"] for b in call("bdev_get_bdevs")["result"]]
assert "wb1" not in names and "wb0" in names, names
print("  mode 1 refused:", msg)
PY

stop_host
start_host
qemu_io -c 'read -P 0xab 0 1M'
stop_host
echo "bare-host: the embedded default ran without PMDK; data survived a clean restart"
