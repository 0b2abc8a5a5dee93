#!/usr/bin/env bash
# Host benchmark: fio over NBD, 4 KiB, writeboost against qemu-nbd serving
# the backing file directly, side by side in one run:
#   (a) randwrite, QD 32
#   (b) sequential write with fsync=1 (a FLUSH after every write), QD 1,
#       for writeboost in mode 0 (barrier deadline 10 ms and 0) and in mode 1
#   (c) randread of data written just before, QD 32
# and the host's CPU use when idle.
#
#   bash test/bench-host.sh
#
# Knobs: SECONDS_PER_RUN (default 10), SIZE (working set, default 512M),
# BENCH_DIR (where the files go, default /var/tmp: a disk, so O_DIRECT works).
# Mode 1's pool is a file on /dev/shm that libpmem2 persists by CPU cache
# flushes, as it would on DAX pmem (PMEM2_FORCE_GRANULARITY=CACHE_LINE).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${SECONDS_PER_RUN:-10}
SIZE=${SIZE:-512M}
for tool in fio qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "bench-host: $tool is needed (Debian: fio, qemu-utils)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench-host: this fio has no nbd engine" >&2; exit 1; }

cargo build --release -q --bin writeboost
BIN=$PWD/target/release/writeboost
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/wb-bench-host.XXXXXX")
POOL_DIR=$(mktemp -d /dev/shm/wb-bench-pool.XXXXXX 2>/dev/null || mktemp -d "$WORK/pool.XXXXXX")
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK" "$POOL_DIR"
}
trap cleanup EXIT

truncate -s 2G "$WORK/cache.img"
truncate -s 4G "$WORK/backing.img"
PORT=$((20000 + RANDOM % 20000))

wait_port() {
    local i
    for i in $(seq 1 200); do
        if nbdinfo --size "nbd://127.0.0.1:$PORT/wb0" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "bench-host: nothing serves NBD on port $PORT" >&2
    return 1
}

# start_writeboost MODE [EXTRA_YAML] — a fresh cache over the benchmark files.
start_writeboost() {
    local mode=$1 pool="" extra=${2:-}
    if [ "$mode" = 1 ]; then
        truncate -s 64M "$POOL_DIR/pool"
        pool=", mode: 1, pmem_path: $POOL_DIR/pool"
    fi
    cat >"$WORK/wb.yaml" <<EOF
aio:
  - {name: Cache0, filename: $WORK/cache.img, block_size: 4096}
  - {name: Backing0, filename: $WORK/backing.img, block_size: 4096}
writeboost:
  - {name: wb0, backing_bdev: Backing0, cache_bdev: Cache0, format: true$pool$extra}
nbd:
  - {bdev_name: wb0, listen: "127.0.0.1:$PORT"}
EOF
    PMEM2_FORCE_GRANULARITY=CACHE_LINE "$BIN" -c "$WORK/wb.yaml" -r "$WORK/rpc.sock" \
        >"$WORK/wb-$mode.log" 2>&1 &
    SERVER=$!
    PIDS+=("$SERVER")
    wait_port
}

start_qemu_nbd() {
    qemu-nbd -f raw --cache=none --aio=native -t -x wb0 -b 127.0.0.1 -p "$PORT" \
        "$WORK/backing.img" >"$WORK/qemu-nbd.log" 2>&1 &
    SERVER=$!
    PIDS+=("$SERVER")
    wait_port
}

stop_server() {
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
}

# fio_iops RW IODEPTH EXTRA... — IOPS of one fio job over NBD.
fio_iops() {
    local rw=$1 qd=$2
    shift 2
    fio --name=bench --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/wb0" --rw="$rw" --bs=4k \
        --iodepth="$qd" --size="$SIZE" --time_based --runtime="$T" --output-format=json "$@" \
        >"$WORK/fio.json" 2>"$WORK/fio.err" || {
        echo "bench-host: fio failed:" >&2
        cat "$WORK/fio.err" >&2
        exit 1
    }
    python3 -c '
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
print(round(j["read"]["iops"] + j["write"]["iops"]))' "$WORK/fio.json"
}

fill() {
    fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/wb0" --rw=write --bs=1M \
        --iodepth=4 --size="$SIZE" >/dev/null 2>&1
}

declare -A R
measure() { # NAME — runs (a), (b), (c) against whatever serves now
    R[$1.a]=$(fio_iops randwrite 32)
    R[$1.b]=$(fio_iops write 1 --fsync=1)
    fill
    R[$1.c]=$(fio_iops randread 32)
}

echo "fio over NBD, 4 KiB, ${SIZE} working set, ${T} s per run (files in $WORK)"
start_qemu_nbd
measure qemu
stop_server
start_writeboost 0
measure wb0
stop_server
start_writeboost 1
R[wb1.b]=$(fio_iops write 1 --fsync=1)
stop_server
start_writeboost 0 ", barrier_deadline_ms: 0"
R[wb0d.b]=$(fio_iops write 1 --fsync=1)
stop_server

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
printf '\n%-34s %12s %12s %8s\n' "workload" "qemu-nbd" "writeboost" "ratio"
printf '%-34s %12s %12s %8s\n' "(a) randwrite QD32" "${R[qemu.a]}" "${R[wb0.a]}" "$(ratio "${R[wb0.a]}" "${R[qemu.a]}")"
printf '%-34s %12s %12s %8s\n' "(b) write fsync=1 QD1, mode 0" "${R[qemu.b]}" "${R[wb0.b]}" "$(ratio "${R[wb0.b]}" "${R[qemu.b]}")"
printf '%-34s %12s %12s %8s\n' "(b) ... mode 0, deadline 0 ms" "${R[qemu.b]}" "${R[wb0d.b]}" "$(ratio "${R[wb0d.b]}" "${R[qemu.b]}")"
printf '%-34s %12s %12s %8s\n' "(b) write fsync=1 QD1, mode 1" "${R[qemu.b]}" "${R[wb1.b]}" "$(ratio "${R[wb1.b]}" "${R[qemu.b]}")"
printf '%-34s %12s %12s %8s\n' "(c) randread of cached data QD32" "${R[qemu.c]}" "${R[wb0.c]}" "$(ratio "${R[wb0.c]}" "${R[qemu.c]}")"
echo "(b) mode 1 / mode 0: $(ratio "${R[wb1.b]}" "${R[wb0.b]}") (barrier_deadline_ms 10, the default)," \
    "$(ratio "${R[wb1.b]}" "${R[wb0d.b]}") (barrier_deadline_ms 0)"

# Idle CPU: the default back-off, nothing connected, 5 s.
start_writeboost 0
sleep 1
ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }
t0=$(ticks)
sleep 5
t1=$(ticks)
hz=$(getconf CLK_TCK)
echo "idle CPU of the host (one reactor, default back-off): $(python3 -c "print(f'{($t1 - $t0) / $hz / 5 * 100:.2f}')") % of one core"
stop_server
