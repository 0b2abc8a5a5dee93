#!/usr/bin/env bash
# SPDK benchmark: bdevperf on one core, 4 KiB, over malloc base bdevs, all in
# one run so the ratios compare like with like:
#   passthru over malloc | OCF write-back | writeboost mode 0 | writeboost mode 1
# for randwrite (QD 32) and randread of data written just before (QD 32).
# Then, with bdev_delay in front of the cache (write 20 µs) and the backing
# (2 ms), the latency of QD 1 write+FLUSH pairs in mode 1 and mode 0.
# Mode 1 pools live on tmpfs; see the note at the mode 1 runs.
#
#   SPDK_DIR=/path/to/spdk bash test/spdk/bench.sh
#
# Knobs: SECONDS_PER_RUN (default 5), PAIRS (default 2000).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if ! spdk_locate; then
    echo "SKIPPED: SPDK benchmark: SPDK not found (set SPDK_DIR to a built SPDK, or install it for pkg-config)"
    exit 0
fi
[ -n "$BDEVPERF_PY" ] || { echo "bdevperf.py not found under $SPDK_ROOT" >&2; exit 1; }
bench_setup bench
PAIRS=${PAIRS:-2000}

# perf NAME TARGET_BDEV ENTRY... — fills TARGET_BDEV sequentially, then
# measures randread and randwrite; sets READ_IOPS and WRITE_IOPS.
perf() {
    local name=$1 target=$2
    shift 2
    bdev_config "$@" >"$WORK/$name.json"
    local sock=$WORK/$name.sock log=$WORK/$name.log
    rm -f "$sock"
    env LD_PRELOAD="$WB_LIB" ${PERF_ENV:-} "$BDEVPERF" "${SPDK_APP_ARGS[@]}" -s 4096 -m 0x1 -z -r "$sock" \
        -c "$WORK/$name.json" -T "$target" -q 32 -o 4096 -w randread -t "$T" >"$log" 2>&1 &
    local pid=$!
    SPDK_PIDS+=("$pid")
    local i
    for i in $(seq 1 300); do
        [ -S "$sock" ] && break
        sleep 0.1
    done
    bp() { python3 "$BDEVPERF_PY" -s "$sock" -t 600 perform_tests -q 32 -o 4096 "$@"; }
    bp -w write -t 3 >"$WORK/$name.fill" 2>&1
    bp -w randread -t "$T" >"$WORK/$name.read" 2>&1
    bp -w randwrite -t "$T" >"$WORK/$name.write" 2>&1
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    READ_IOPS=$(result_iops "$WORK/$name.read")
    WRITE_IOPS=$(result_iops "$WORK/$name.write")
    if [ -z "$READ_IOPS" ] || [ -z "$WRITE_IOPS" ]; then
        echo "$name: no result; bdevperf log:" >&2
        tail -n 30 "$log" "$WORK/$name.read" "$WORK/$name.write" >&2
        exit 1
    fi
}

# The IOPS of a perform_tests result (JSON with results[0].iops).
result_iops() {
    python3 -c '
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index("{"):])
print(round(sum(r["iops"] for r in d["results"])))' "$1" 2>/dev/null || true
}

make_pool "$POOLS/pool" 64M
echo "bdevperf, one core, 4 KiB, QD 32, ${T} s per run; 256 MiB written, then read back at random"
printf '%-22s %12s %12s\n' "bdev" "randwrite" "randread"
declare -A W R
run() {
    PERF_ENV=${PERF_ENV:-} perf "$@"
    W[$1]=$WRITE_IOPS
    R[$1]=$READ_IOPS
    printf '%-22s %12s %12s\n' "$1" "$WRITE_IOPS" "$READ_IOPS"
}
run passthru pt0 "$BACK" '{"method":"bdev_passthru_create","params":{"base_bdev_name":"Back0","name":"pt0"}}'
run ocf-wb ocf0 "$CACHE" "$BACK" \
    '{"method":"bdev_ocf_create","params":{"name":"ocf0","mode":"wb","cache_bdev_name":"Cache0","core_bdev_name":"Back0"}}'
run writeboost-mode0 wb0 "$CACHE" "$BACK" "$(wb_entry wb0 Cache0 Back0 0)"
# Mode 1 as on DAX pmem: the pool is on tmpfs and libpmem2 is told to persist
# by CPU cache flushes, as it does on DAX (PMEM2_FORCE_GRANULARITY). Then as
# libpmem2 treats a non-DAX file by default: one msync per persist.
PERF_ENV=PMEM2_FORCE_GRANULARITY=CACHE_LINE run writeboost-mode1 wb0 "$CACHE" "$BACK" \
    "$(wb_entry wb0 Cache0 Back0 1 "$POOLS/pool")"
make_pool "$POOLS/pool" 64M
run writeboost-mode1-msync wb0 "$CACHE" "$BACK" "$(wb_entry wb0 Cache0 Back0 1 "$POOLS/pool")"
# Background writeback waits writeback_delay_ms (1 s by default) after a log
# is durable; with 0 it starts at once, as dm-writeboost does, and over malloc
# that means more copies on the same core.
run writeboost-mode0-delay0 wb0 "$CACHE" "$BACK" "$(wb_entry wb0 Cache0 Back0 0 "" '"writeback_delay_ms":0')"

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo
for m in writeboost-mode0 writeboost-mode1 writeboost-mode1-msync writeboost-mode0-delay0; do
    echo "$m: randwrite $(ratio "${W[$m]}" "${W[passthru]}") x passthru, $(ratio "${W[$m]}" "${W[ocf-wb]}") x OCF wb;" \
        "randread $(ratio "${R[$m]}" "${R[passthru]}") x passthru"
done

# QD 1 write+FLUSH pairs over delayed base bdevs.
echo
echo "QD 1 write+FLUSH pairs, cache bdev_delay write 20 us, backing bdev_delay 2 ms, ${PAIRS} pairs"
delayed() {
    # bdev_delay latencies are in microseconds.
    printf '{"method":"bdev_delay_create","params":{"base_bdev_name":"%s","name":"%s","avg_read_latency":%s,"p99_read_latency":%s,"avg_write_latency":%s,"p99_write_latency":%s}}' \
        "$1" "$2" "$3" "$3" "$4" "$4"
}
declare -A MEAN
# mode 0 seals the buffer at the barrier deadline (10 ms by default) to
# gather more writes into the log; with barrier_deadline_ms=0 it seals at
# once and every pair writes a partial log.
for variant in mode1 mode0 mode0-deadline0; do
    pool="" extra=""
    mode=${variant:4:1}
    [ "$mode" = 1 ] && pool="$POOLS/pool" && make_pool "$POOLS/pool" 64M
    [ "$variant" = mode0-deadline0 ] && extra='"barrier_deadline_ms":0'
    bdev_config "$CACHE" "$BACK" "$(delayed Cache0 DCache 20 20)" "$(delayed Back0 DBack 2000 2000)" \
        "$(wb_entry wb0 DCache DBack "$mode" "$pool" "$extra")" >"$WORK/pairs-$variant.json"
    out=$(env LD_PRELOAD="$WB_LIB" PMEM2_FORCE_GRANULARITY=CACHE_LINE "$WB_CHECK" pairs wb0 "$PAIRS" 5 -- --json "$WORK/pairs-$variant.json" \
        "${SPDK_APP_ARGS[@]}" -s 4096 -m 0x1 -r "$WORK/pairs.sock" 2>"$WORK/pairs-$variant.log") || {
        echo "pairs $variant failed:" >&2
        tail -n 20 "$WORK/pairs-$variant.log" >&2
        exit 1
    }
    line=$(grep -o 'pairs=.*' <<<"$out")
    printf '%-28s %s\n' "writeboost-$variant:" "$line"
    MEAN[$variant]=$(grep -o 'mean_us=[0-9.]*' <<<"$line" | cut -d= -f2)
done
echo "mean write+FLUSH latency, mode 0 / mode 1: $(ratio "${MEAN[mode0]}" "${MEAN[mode1]}") (default deadline)," \
    "$(ratio "${MEAN[mode0-deadline0]}" "${MEAN[mode1]}") (barrier_deadline_ms=0)"
