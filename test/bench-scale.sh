#!/usr/bin/env bash
# Scale benchmark: what a large cache costs at start-up and in memory. For
# each cache size, on sparse files: fill 85 % of the cache with dirty data
# over NBD (background writeback and bypass off), then measure
#   - resident memory of the host per cached 4 KiB block: in all, and above
#     what the same host holds with the cache empty (its fixed cost: buffers,
#     code, the NBD server), which is what grows with the cache,
#   - resume after kill -9 (start until the NBD export serves again),
#   - resume after a clean shutdown (SIGTERM, then start again),
# each resume timed RESUMES times (default 3), the median reported.
#
#   bash test/bench-scale.sh                 # 4 GiB
#   SIZES="4 16 64" bash test/bench-scale.sh # each size in GiB (64 GiB writes 54 GiB)
#
# Knobs: SIZES (GiB, default 4), BENCH_DIR (default /var/tmp: a disk, so
# O_DIRECT works; the files are sparse but the dirty data is real), SETTLE
# (seconds, default 10) waited after `sync` before each timed start: a
# virtual disk goes on absorbing a fill of tens of GiB after it is
# acknowledged, and a start right after it times that instead (at 64 GiB:
# 1.6 to 4 s for the same resume).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-4}
FIO=""
for f in fio /usr/bin/fio; do
    if command -v "$f" >/dev/null && "$f" --enghelp 2>/dev/null | grep -qw nbd; then
        FIO=$(command -v "$f")
        break
    fi
done
[ -n "$FIO" ] || { echo "bench-scale: needs fio with its nbd engine (Debian: fio)" >&2; exit 1; }
for tool in nbdinfo python3; do
    command -v "$tool" >/dev/null || { echo "bench-scale: $tool is needed (Debian: libnbd-bin, python3)" >&2; exit 1; }
done

cargo build --release -q --bin writeboost
BIN=$PWD/target/release/writeboost
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/wb-bench-scale.XXXXXX")
SERVER=""
cleanup() {
    [ -n "$SERVER" ] && kill -9 "$SERVER" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$((20000 + RANDOM % 20000))
URI="nbd://127.0.0.1:$PORT/wb0"

now() { date +%s.%N; }

# start — the host over the benchmark files; returns once the export serves.
start() {
    "$BIN" -c "$WORK/wb.yaml" -r "$WORK/rpc.sock" >>"$WORK/wb.log" 2>&1 &
    SERVER=$!
    local i
    for i in $(seq 1 60000); do
        nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
        kill -0 "$SERVER" 2>/dev/null || { echo "bench-scale: the host exited:" >&2; tail -5 "$WORK/wb.log" >&2; exit 1; }
        sleep 0.01
    done
    echo "bench-scale: nothing serves NBD on port $PORT" >&2
    exit 1
}

settle() {
    sync
    sleep "${SETTLE:-10}"
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$SERVER/status"; }

# rpc METHOD [PARAMS_JSON] — the host's JSON-RPC, result on stdout.
rpc() {
    python3 - "$WORK/rpc.sock" "$1" "${2:-null}" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
req = {"jsonrpc": "2.0", "id": 1, "method": sys.argv[2]}
if sys.argv[3] != "null":
    req["params"] = json.loads(sys.argv[3])
s.sendall(json.dumps(req).encode())
buf = b""
while True:
    buf += s.recv(65536)
    try:
        print(json.dumps(json.loads(buf)["result"]))
        break
    except ValueError:
        continue
EOF
}

# status FIELD — one field of the device's status.
status() {
    rpc bdev_writeboost_get_stats '{"name": "wb0"}' |
        python3 -c 'import json,sys; j=json.load(sys.stdin); j=j[0] if isinstance(j,list) else j; print(j["status"][sys.argv[1]])' "$1"
}

# stat_field FIELD — one of the device's counters.
stat_field() {
    rpc bdev_writeboost_get_stats '{"name": "wb0"}' |
        python3 -c 'import json,sys; j=json.load(sys.stdin); j=j[0] if isinstance(j,list) else j; print(j["stats"][sys.argv[1]])' "$1"
}

printf '%-8s %12s %9s %9s %9s %11s %13s %13s\n' "cache" "dirty blocks" "RSS MiB" "B/block" "empty MiB" "B/block>" "crash resume" "clean resume"
for G in $SIZES; do
    rm -f "$WORK"/*.img
    truncate -s "${G}G" "$WORK/cache.img"
    truncate -s "$((G * 2))G" "$WORK/backing.img"
    cat >"$WORK/wb.yaml" <<EOF
aio:
  - {name: Cache0, filename: $WORK/cache.img, block_size: 4096}
  - {name: Backing0, filename: $WORK/backing.img, block_size: 4096}
writeboost:
  - {name: wb0, backing_bdev: Backing0, cache_bdev: Cache0, writeback_threshold: 0, bypass_write_kib: 0}
nbd:
  - {bdev_name: wb0, listen: "127.0.0.1:$PORT"}
EOF
    start
    empty=$(rss_kib)
    fill=$((G * 1024 * 85 / 100))
    # end_fsync: a FLUSH at the end, so every written block is owed after a crash.
    "$FIO" --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 \
        --size="${fill}M" --end_fsync=1 >"$WORK/fio.log" 2>&1 || { cat "$WORK/fio.log" >&2; exit 1; }
    blocks=$(status nr_dirty_blocks)
    # Crash: the cache holds its dirty logs; resume replays them. Each
    # resume is timed RESUMES times (the median is reported: a shared disk
    # varies from one start to the next), memory after the first.
    crash=() clean=() rss=""
    for _ in $(seq 1 "${RESUMES:-3}"); do
        kill -9 "$SERVER"
        wait "$SERVER" 2>/dev/null || true
        settle
        t0=$(now)
        start
        crash+=("$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$(now)")")
        [ -n "$rss" ] || rss=$(rss_kib)
        after=$(status nr_dirty_blocks)
        if [ "$after" != "$blocks" ]; then
            echo "bench-scale: $blocks dirty blocks before the crash, $after after it: flushed data lost" >&2
            exit 1
        fi
    done
    # Clean shutdown, then resume from the checkpoint.
    for _ in $(seq 1 "${RESUMES:-3}"); do
        kill -TERM "$SERVER"
        wait "$SERVER" 2>/dev/null || true
        settle
        t0=$(now)
        start
        clean+=("$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$(now)")")
        after=$(status nr_dirty_blocks)
        loaded=$(stat_field checkpoints_loaded)
        if [ "$after" != "$blocks" ] || [ "$loaded" != 1 ]; then
            echo "bench-scale: after a clean shutdown $after dirty blocks (of $blocks), checkpoint loaded: $loaded" >&2
            exit 1
        fi
    done
    kill -TERM "$SERVER"
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
    python3 - "$G" "$blocks" "$rss" "$empty" "${crash[*]}" "${clean[*]}" <<'EOF'
import statistics, sys
g, blocks, rss, empty = map(int, sys.argv[1:5])
crash, clean = ([float(t) for t in a.split()] for a in sys.argv[5:7])
b = max(blocks, 1)
print(f"{g:>5} GiB {blocks:>12} {rss / 1024:>9.0f} {rss * 1024 / b:>9.1f} {empty / 1024:>9.0f} "
      f"{(rss - empty) * 1024 / b:>11.1f} {statistics.median(crash):>11.2f} s "
      f"{statistics.median(clean):>11.2f} s   (each: {' '.join(f'{t:.2f}' for t in crash)} / "
      f"{' '.join(f'{t:.2f}' for t in clean)})")
EOF
done
