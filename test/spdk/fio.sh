#!/usr/bin/env bash
# fio through SPDK's bdev plugin (ioengine=spdk_bdev), side by side in one
# run, over malloc base bdevs (256 MiB of data, 512 MiB cache):
#   passthru | OCF write-back | writeboost mode 0 (and with
#   barrier_deadline_ms=0) | writeboost mode 1
# Each fills the bdev sequentially, then runs 4 KiB randwrite at QD 32,
# 4 KiB randread of the data just written (cached) at QD 32, and 4 KiB
# write+fsync pairs at QD 1 (fio's fsync=1: every write is followed by a
# FLUSH, which SPDK's plugin turns into spdk_bdev_flush).
#
#   SPDK_DIR=/path/to/spdk FIO=/path/to/fio bash test/spdk/fio.sh
#
# SPDK must have been configured --with-fio=<fio source tree>, and FIO must
# be the fio built from that tree (the plugin is built against its headers).
# Knobs: SECONDS_PER_RUN (default 5).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

fio_plugin_locate "fio SPDK plugin benchmark" || exit 0
bench_setup fio

# fio_run NAME TARGET_BDEV ENTRY... — the four jobs against TARGET_BDEV;
# sets WRITE READ PAIRS (IOPS; PAIRS in write+fsync pairs per second).
fio_run() {
    local name=$1 target=$2
    shift 2
    bdev_config "$@" >"$WORK/$name.json"
    cat >"$WORK/$name.fio" <<JOB
[global]
ioengine=spdk_bdev
spdk_json_conf=$WORK/$name.json
env_context=--no-huge --no-pci --legacy-mem --iova-mode=va
spdk_mem=2048
thread=1
direct=1
filename=$target
size=256M
bs=4k
norandommap=1
randrepeat=0

[fill]
rw=write
bs=128k
iodepth=32

[randwrite-qd32]
stonewall
rw=randwrite
iodepth=32
time_based=1
runtime=$T

[randread-qd32]
stonewall
rw=randread
iodepth=32
time_based=1
runtime=$T

[write-fsync-qd1]
stonewall
rw=randwrite
iodepth=1
fsync=1
time_based=1
runtime=$T
JOB
    if ! env LD_PRELOAD="$PLUGIN $WB_LIB" ${FIO_ENV:-} "$FIO" --output-format=json \
        --output="$WORK/$name.out" "$WORK/$name.fio" >"$WORK/$name.log" 2>&1; then
        echo "$name: fio failed:" >&2
        tail -n 30 "$WORK/$name.log" "$WORK/$name.out" >&2
        exit 1
    fi
    read -r WRITE READ PAIRS < <(python3 - "$WORK/$name.out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index("{"):])
jobs = {j["jobname"]: j for j in d["jobs"]}
for j in jobs.values():
    if j["error"]:
        sys.exit(f"job {j['jobname']} failed with error {j['error']}")
w = jobs["randwrite-qd32"]["write"]["iops"]
r = jobs["randread-qd32"]["read"]["iops"]
p = jobs["write-fsync-qd1"]["write"]["iops"]
print(round(w), round(r), round(p))
PY
)
}

make_pool "$POOLS/pool" 64M
echo "fio $("$FIO" --version) with SPDK's bdev plugin, 4 KiB, ${T} s per job; 256 MiB filled, then:"
printf '%-22s %16s %16s %22s\n' "bdev" "randwrite QD32" "randread QD32" "write+fsync QD1 /s"
declare -A W R P
run() {
    fio_run "$@"
    W[$1]=$WRITE R[$1]=$READ P[$1]=$PAIRS
    printf '%-22s %16s %16s %22s\n' "$1" "$WRITE" "$READ" "$PAIRS"
}
run passthru pt0 "$BACK" '{"method":"bdev_passthru_create","params":{"base_bdev_name":"Back0","name":"pt0"}}'
run ocf-wb ocf0 "$CACHE" "$BACK" \
    '{"method":"bdev_ocf_create","params":{"name":"ocf0","mode":"wb","cache_bdev_name":"Cache0","core_bdev_name":"Back0"}}'
run writeboost-mode0 wb0 "$CACHE" "$BACK" "$(wb_entry wb0 Cache0 Back0 0)"
# A FLUSH in mode 0 waits up to barrier_deadline_ms (10) for the buffer to
# fill; with 0 it writes a partial log at once.
run writeboost-mode0-dl0 wb0 "$CACHE" "$BACK" "$(wb_entry wb0 Cache0 Back0 0 "" '"barrier_deadline_ms":0')"
# Mode 1 as on DAX pmem (the pool on tmpfs, persisted by cache flushes; see bench.sh).
FIO_ENV=PMEM2_FORCE_GRANULARITY=CACHE_LINE run writeboost-mode1 wb0 "$CACHE" "$BACK" \
    "$(wb_entry wb0 Cache0 Back0 1 "$POOLS/pool")"

ratio() { python3 -c "print(f'{$1 / $2:.3g}')"; }
echo
for m in writeboost-mode0 writeboost-mode0-dl0 writeboost-mode1; do
    echo "$m: randwrite $(ratio "${W[$m]}" "${W[passthru]}") x passthru, $(ratio "${W[$m]}" "${W[ocf-wb]}") x OCF wb;" \
        "randread $(ratio "${R[$m]}" "${R[passthru]}") x passthru, $(ratio "${R[$m]}" "${R[ocf-wb]}") x OCF wb;" \
        "write+fsync $(ratio "${P[$m]}" "${P[passthru]}") x passthru, $(ratio "${P[$m]}" "${P[ocf-wb]}") x OCF wb"
done
echo "write+fsync QD1, mode 1 / mode 0: $(ratio "${P[writeboost-mode1]}" "${P[writeboost-mode0]}") (default deadline)," \
    "$(ratio "${P[writeboost-mode1]}" "${P[writeboost-mode0-dl0]}") (barrier_deadline_ms=0)"
