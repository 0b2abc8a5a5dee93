#!/usr/bin/env bash
# SPDK benchmark: how one bdev scales with the cores that submit to it, and
# how two writeboost devices share two cores. bdevperf, 4 KiB, QD 32 per
# core, with -C so every core submits to the bdev, at 1 core and at 2 cores,
# all in one run so the ratios compare like with like:
#   passthru | OCF write-back | writeboost mode 0 | writeboost mode 1
# and, at 2 cores, writeboost with its base-bdev I/O on the other core
# (io_core: the -io rows).
# Workloads:
#   over: randwrite over a working set 4x the cache (256 MiB cache, 1 GiB
#         backing, malloc), so writeback and the full cache are in the run;
#   fits: randwrite, then randread, within the cache (512 MiB cache, 256 MiB
#         backing, written sequentially first).
# Then two writeboost devices (fits), one per core, against one device on
# one core. Every figure is IOPS; per core is each core's bdevperf job.
#
#   SPDK_DIR=/path/to/spdk bash test/spdk/bench-cores.sh
#
# With BEFORE_LIB set to another build's libbdev_writeboost.so, it instead
# compares that build with this one on one core (fits, modes 0 and 1),
# interleaved, ROUNDS times (default 3):
#
#   BEFORE_LIB=/tmp/before/target/release/libbdev_writeboost.so SPDK_DIR=... bash test/spdk/bench-cores.sh
#
# Knobs: SECONDS_PER_RUN (default 8), ONLY (a space-separated subset of
# passthru ocf-wb writeboost-mode0 writeboost-mode1 writeboost-mode0-io
# writeboost-mode1-io), WB_PARAMS (extra bdev_writeboost_create parameters,
# e.g. '"writeback_delay_ms":0').
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if ! spdk_locate; then
    echo "SKIPPED: SPDK core-scaling benchmark: SPDK not found (set SPDK_DIR to a built SPDK, or install it for pkg-config)"
    exit 0
fi
[ -n "$BDEVPERF_PY" ] || { echo "bdevperf.py not found under $SPDK_ROOT" >&2; exit 1; }
if [ "$(nproc)" -lt 2 ]; then
    echo "SKIPPED: SPDK core-scaling benchmark: needs 2 cores, this machine has $(nproc)"
    exit 0
fi
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
bench_setup cores
ONLY=${ONLY:-passthru ocf-wb writeboost-mode0 writeboost-mode1 writeboost-mode0-io writeboost-mode1-io}
EXTRA=${WB_PARAMS:-}

# Base bdevs of each workload: CACHE_<w> and BACK_<w> (4 KiB blocks).
cache_of() { case $1 in over) echo 65536 ;; fits) echo 131072 ;; esac; }
back_of() { case $1 in over) echo 262144 ;; fits) echo 65536 ;; esac; }

# entries TARGET WORKLOAD SUFFIX NDEV — the config entries of one bdev
# under test, named <kind>SUFFIX over CacheSUFFIX and BackSUFFIX. An -io
# target puts device n on core n and its base I/O on the other core.
entries() {
    local t=$1 w=$2 n=$3 ndev=$4
    local c b extra=$EXTRA
    case $t in
        *-io)
            extra="${extra:+$extra,}\"core\":$n,\"io_core\":$((1 - n))"
            t=${t%-io}
            ;;
    esac
    c=$(malloc_entry "Cache$n" "$(cache_of "$w")" 4096)
    b=$(malloc_entry "Back$n" "$(back_of "$w")" 4096)
    case $t in
        passthru) printf '%s\n%s\n' "$b" \
            "{\"method\":\"bdev_passthru_create\",\"params\":{\"base_bdev_name\":\"Back$n\",\"name\":\"dut$n\"}}" ;;
        ocf-wb) printf '%s\n%s\n%s\n' "$c" "$b" \
            "{\"method\":\"bdev_ocf_create\",\"params\":{\"name\":\"dut$n\",\"mode\":\"wb\",\"cache_bdev_name\":\"Cache$n\",\"core_bdev_name\":\"Back$n\"}}" ;;
        writeboost-mode0) printf '%s\n%s\n%s\n' "$c" "$b" "$(wb_entry "dut$n" "Cache$n" "Back$n" 0 "" "$extra")" ;;
        writeboost-mode1)
            make_pool "$POOLS/pool$n" 64M
            printf '%s\n%s\n%s\n' "$c" "$b" "$(wb_entry "dut$n" "Cache$n" "Back$n" 1 "$POOLS/pool$n" "$extra")" ;;
    esac
}

# Per-job IOPS of a perform_tests result, one "core_mask iops" line per job.
job_iops() {
    python3 -c '
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index("{"):])
for r in d["results"]:
    if r.get("job", "").startswith("Total") or "core_mask" not in r:
        continue
    print(r["core_mask"], round(r["iops"]))' "$1" 2>/dev/null || true
}

# bench NAME MASK EVERY_CORE WORKLOAD NDEV TARGET — one bdevperf process on
# cores MASK (-C when EVERY_CORE is 1) over NDEV bdevs of TARGET; runs the
# workload's phases and leaves each phase's per-job IOPS in $WORK/NAME.<phase>.
bench() {
    local name=$1 mask=$2 every=$3 w=$4 ndev=$5 t=$6
    local list=() i
    for i in $(seq 0 $((ndev - 1))); do
        while IFS= read -r e; do list+=("$e"); done < <(entries "$t" "$w" "$i" "$ndev")
    done
    bdev_config "${list[@]}" >"$WORK/$name.json"
    local sock=$WORK/$name.sock log=$WORK/$name.log flags=()
    [ "$every" = 1 ] && flags=(-C)
    rm -f "$sock"
    env LD_PRELOAD="${LIB:-$WB_LIB}" PMEM2_FORCE_GRANULARITY=CACHE_LINE "$BDEVPERF" "${SPDK_APP_ARGS[@]}" -s 4096 \
        -m "$mask" "${flags[@]}" -z -r "$sock" -c "$WORK/$name.json" -q 32 -o 4096 -w randwrite -t "$T" >"$log" 2>&1 &
    local pid=$!
    SPDK_PIDS+=("$pid")
    for i in $(seq 1 300); do
        [ -S "$sock" ] && break
        sleep 0.1
    done
    bp() { python3 "$BDEVPERF_PY" -s "$sock" -t 600 perform_tests -q 32 -o 4096 "$@"; }
    if [ "$w" = fits ]; then
        bp -w write -t 4 >"$WORK/$name.fill" 2>&1
        bp -w randwrite -t "$T" >"$WORK/$name.randwrite" 2>&1
        bp -w randread -t "$T" >"$WORK/$name.randread" 2>&1
    else
        bp -w randwrite -t "$T" >"$WORK/$name.randwrite" 2>&1
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# report LABEL FILE — total IOPS, per-core IOPS, and the largest distance of
# a core from the mean; sets TOTAL.
report() {
    local label=$1 file=$2
    local jobs
    jobs=$(job_iops "$file")
    if [ -z "$jobs" ]; then
        echo "$label: no result; bdevperf output:" >&2
        tail -n 30 "$file" "${file%.*}.log" >&2
        exit 1
    fi
    read -r TOTAL per spread < <(python3 -c '
import sys
rows = [l.split() for l in sys.argv[1].splitlines()]
by = {}
for mask, iops in rows:
    by[mask] = by.get(mask, 0) + int(iops)
vals = list(by.values())
mean = sum(vals) / len(vals)
spread = max(abs(v - mean) / mean for v in vals) * 100 if mean else 0
print(sum(vals), "/".join(str(v) for v in vals), f"{spread:.0f}%")' "$jobs")
    printf '%-34s %10s   per core %-22s fairness %s\n' "$label" "$TOTAL" "$per" "$spread"
}

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
declare -A R

if [ -n "${BEFORE_LIB:-}" ]; then
    [ -f "$BEFORE_LIB" ] || { echo "BEFORE_LIB=$BEFORE_LIB is not a file" >&2; exit 1; }
    echo "one core, fits, ${T} s per phase: before ($BEFORE_LIB) and after, interleaved (IOPS)"
    for round in $(seq 1 "${ROUNDS:-3}"); do
        for t in writeboost-mode0 writeboost-mode1; do
            for which in before after; do
                lib=$WB_LIB
                [ "$which" = before ] && lib=$BEFORE_LIB
                LIB=$lib bench "ab-$round-$t-$which" 0x1 1 fits 1 "$t"
                printf 'round %s %-18s %-6s randwrite %8s randread %8s\n' "$round" "$t" "$which" \
                    "$(job_iops "$WORK/ab-$round-$t-$which.randwrite" | awk '{ s += $2 } END { print s }')" \
                    "$(job_iops "$WORK/ab-$round-$t-$which.randread" | awk '{ s += $2 } END { print s }')"
            done
        done
    done
    exit 0
fi

echo "bdevperf -C, 4 KiB, QD 32 per core, ${T} s per phase (IOPS; fairness: largest distance of a core from the mean)"
for w in over fits; do
    echo
    case $w in
        over) echo "over: randwrite, 1 GiB working set over a 256 MiB cache" ;;
        fits) echo "fits: randwrite then randread, 256 MiB working set in a 512 MiB cache" ;;
    esac
    for t in $ONLY; do
        for cores in 1 2; do
            # (At 1 core an -io target is its plain one.)
            case $t in *-io) [ "$cores" = 1 ] && continue ;; esac
            mask=$([ "$cores" = 1 ] && echo 0x1 || echo 0x3)
            bench "$w-$t-$cores" "$mask" 1 "$w" 1 "$t"
            for phase in randwrite randread; do
                [ -f "$WORK/$w-$t-$cores.$phase" ] || continue
                report "$w $phase $t ${cores}c" "$WORK/$w-$t-$cores.$phase"
                R[$w-$phase-$t-$cores]=$TOTAL
            done
        done
    done
done

echo
echo "two writeboost devices, one bdevperf job each, on 2 cores (fits)"
for t in $ONLY; do
    case $t in writeboost-*) ;; *) continue ;; esac
    bench "two-$t" 0x3 0 fits 2 "$t"
    for phase in randwrite randread; do
        report "two devices $phase $t 2c" "$WORK/two-$t.$phase"
        R[two-$phase-$t]=$TOTAL
    done
done

echo
echo "ratios"
for w in over fits; do
    for phase in randwrite randread; do
        for t in $ONLY; do
            one=${R[$w-$phase-${t%-io}-1]:-}
            two=${R[$w-$phase-$t-2]:-}
            [ -n "$one" ] && [ -n "$two" ] || continue
            line="$w $phase $t: 2 cores / 1 core $(ratio "$two" "$one")"
            if [ -n "${R[$w-$phase-ocf-wb-2]:-}" ] && [ "$t" != ocf-wb ]; then
                line="$line; at 2 cores $(ratio "$two" "${R[$w-$phase-ocf-wb-2]}") x OCF wb"
            fi
            echo "$line"
        done
    done
done
for t in $ONLY; do
    for phase in randwrite randread; do
        [ -n "${R[two-$phase-$t]:-}" ] && [ -n "${R[fits-$phase-${t%-io}-1]:-}" ] || continue
        echo "two $t devices on 2 cores / one on 1 core, $phase: $(ratio "${R[two-$phase-$t]}" "${R[fits-$phase-${t%-io}-1]}")"
    done
done
