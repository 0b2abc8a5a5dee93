#!/usr/bin/env bash
# The SPDK module's tests, against a real SPDK: bdevperf verify in both
# buffer modes, save_config and restart with runtime RPCs under load, kill -9
# with an acknowledgement log, hot remove, NVMe-oF/TCP export from a stock
# spdk_tgt, and bad RPC input. Skipped, saying so, without SPDK.
#
#   SPDK_DIR=/path/to/spdk bash test/spdk/run.sh [TEST...]
#
# TEST is any of: verify restart crash hotremove nvmf vhost remote badinput
# (default: all). The targets run on two cores (TGT_MASK, default 0x3), so
# NVMe-oF and vhost submit from both while the device has a thread of its
# own; verify runs bdevperf on one core and on two.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if ! spdk_locate; then
    echo "SKIPPED: SPDK module tests: SPDK not found (set SPDK_DIR to a built SPDK, or install it for pkg-config)"
    exit 0
fi
echo "SPDK module tests against $SPDK_ROOT"
# Mode 1's tests need PMDK's libpmem2: installed on Debian if missing.
source "$(dirname "$0")/../libpmem2.sh"
ensure_libpmem2 test/spdk/run.sh || exit 1
spdk_build_module

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wb-spdk-test.XXXXXX")
POOLS=$(pool_dir)
[ -n "${WB_KEEP:-}" ] && echo "keeping $WORK and $POOLS" || trap 'rm -rf "$WORK" "$POOLS"' EXIT
PORT_BASE=$((4420 + RANDOM % 2000))
TGT_MASK=${TGT_MASK:-0x3}
NQN=nqn.2016-06.io.spdk:writeboost-test

# 1. bdevperf -w verify over malloc base bdevs, mode 0 and mode 1, on one
# core and on two with -C (both cores submit, through write grants, while
# the device's thread runs on the first).
test_verify() {
    local mode cores
    for cores in 1 2; do
        for mode in 0 1; do
            local pool="" mask=0x1 every=()
            [ "$mode" = 1 ] && pool="$POOLS/verify" && make_pool "$POOLS/verify" 64M
            [ "$cores" = 2 ] && mask=0x3 && every=(-C)
            local name=verify$mode-$cores
            bdev_config "$(malloc_entry Cache0 131072 512)" "$(malloc_entry Back0 524288 512)" \
                "$(wb_entry wb0 Cache0 Back0 "$mode" "$pool")" >"$WORK/$name.json"
            BDEVPERF_MASK=$mask bdevperf_run "$WORK/$name.log" -c "$WORK/$name.json" -T wb0 \
                "${every[@]}" -q 32 -o 4096 -w verify -t 4
            local iops
            iops=$(bdevperf_iops "$WORK/$name.log" wb0)
            if [ -z "$iops" ] || grep -qiE "miscompare|io error|failed" "$WORK/$name.log"; then
                echo "verify mode $mode on $cores cores: errors or no result" >&2
                tail -n 30 "$WORK/$name.log" >&2
                return 1
            fi
            echo "  mode $mode, $cores core(s): bdevperf verify ${iops} IOPS, no errors"
        done
    done
}

# A writeboost_tgt over aio bdevs on files, wb0 exported over NVMe/TCP.
# tgt_setup DIR MODE PORT — files are created when missing.
tgt_setup() {
    local dir=$1 mode=$2 port=$3
    mkdir -p "$dir"
    [ -f "$dir/cache.img" ] || truncate -s 256M "$dir/cache.img"
    [ -f "$dir/backing.img" ] || truncate -s 1G "$dir/backing.img"
    local pool=$POOLS/${dir##*/}
    [ -f "$pool" ] || make_pool "$pool" 64M
    start_app "$dir/tgt.log" "$dir/tgt.sock" "$WB_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK"
    TGT_PID=$APP_PID
    local s=$dir/tgt.sock
    rpc "$s" bdev_aio_create "$dir/cache.img" Cache0 4096 >/dev/null
    rpc "$s" bdev_aio_create "$dir/backing.img" Back0 4096 >/dev/null
    wb_create "$s" Back0 "$mode" "$pool"
    nvmf_export "$s" "$port" wb0
}

# nvmf_export SOCK PORT BDEV [NQN SERIAL] — BDEV over NVMe/TCP on 127.0.0.1:PORT.
nvmf_export() {
    local nqn=${4:-$NQN} serial=${5:-WB0000000000001}
    rpc "$1" nvmf_create_transport -t TCP >/dev/null
    rpc "$1" nvmf_create_subsystem "$nqn" -a -s "$serial" >/dev/null
    rpc "$1" nvmf_subsystem_add_ns "$nqn" "$3" >/dev/null
    rpc "$1" nvmf_subsystem_add_listener "$nqn" -t tcp -a 127.0.0.1 -s "$2" >/dev/null
}

# wb_create SOCK BACKING MODE POOL — wb0 over Cache0 and BACKING (POOL in mode 1).
wb_create() {
    if [ "$3" = 1 ]; then
        rpc "$1" bdev_writeboost_create -n wb0 -b "$2" -c Cache0 -m 1 -p "$4" >/dev/null
    else
        rpc "$1" bdev_writeboost_create -n wb0 -b "$2" -c Cache0 >/dev/null
    fi
}

# The initiator side: a bdev_nvme controller N0 (namespace bdev N0n1).
# SPDK's NVMe initiator acknowledges FLUSH without sending it unless
# enable_flush is set; without it nothing a FLUSH promised would hold.
initiator_config() { # PORT [NQN]
    printf '{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_nvme_set_options","params":{"enable_flush":true}},{"method":"bdev_nvme_attach_controller","params":{"name":"N0","trtype":"tcp","adrfam":"ipv4","traddr":"127.0.0.1","trsvcid":"%s","subnqn":"%s"}}]}]}\n' \
        "$1" "${2:-$NQN}"
}

# checker DIR PORT ARGS... — wb_ack_check on the second core over NVMe/TCP
# (to subsystem CHECK_NQN, by default the writeboost target's).
checker() {
    local dir=$1 port=$2
    shift 2
    initiator_config "$port" "${CHECK_NQN:-$NQN}" >"$dir/initiator.json"
    "$WB_CHECK" "$@" -- --json "$dir/initiator.json" "${SPDK_APP_ARGS[@]}" -s 1024 -m 0x2 \
        -r "$dir/check.sock" 2>>"$dir/check.log"
}

# 2. Data survives save_config, a clean stop and a start from that config.
test_restart() {
    local mode
    for mode in 0 1; do
        local dir=$WORK/restart$mode port=$((PORT_BASE + 10 + mode))
        tgt_setup "$dir" "$mode" "$port"
        rpc "$dir/tgt.sock" save_config >"$dir/saved.json"
        grep -q '"bdev_writeboost_create"' "$dir/saved.json" || {
            echo "save_config has no bdev_writeboost_create" >&2
            return 1
        }
        checker "$dir" "$port" write N0n1 "$dir/acks" 32768 4 0 $((7 + mode)) >"$dir/write.out" &
        local cpid=$!
        # Runtime RPCs while I/O runs: tunables, stats, drop_caches, clear_stats.
        local sock=$dir/tgt.sock i
        for i in $(seq 1 100); do
            rpc "$sock" bdev_writeboost_get_stats -n wb0 | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d[0] if isinstance(d, list) else d
sys.exit(0 if d["stats"]["user_write_cmds"] > 0 else 1)' && break
            sleep 0.1
        done
        rpc "$sock" bdev_writeboost_set_options wb0 --writeback-threshold 0 --barrier-deadline-ms 2 >/dev/null
        rpc "$sock" bdev_writeboost_get_stats -n wb0 | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d[0] if isinstance(d, list) else d
assert d["tunables"]["writeback_threshold"] == 0 and d["tunables"]["barrier_deadline_ms"] == 2, d["tunables"]
assert d["stats"]["user_write_cmds"] > 0, "no writes reached the device while the writer ran"'
        rpc "$sock" bdev_writeboost_drop_caches wb0 >/dev/null
        rpc "$sock" bdev_writeboost_clear_stats wb0 >/dev/null
        rpc "$sock" bdev_writeboost_get_quarantine wb0 | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d == {"block_size": 4096, "blocks": []}, d'
        wait "$cpid"
        stop_app "$TGT_PID" "$dir/tgt.sock" || {
            echo "target did not stop cleanly" >&2
            tail -n 20 "$dir/tgt.log" >&2
            return 1
        }
        start_app "$dir/tgt2.log" "$dir/tgt.sock" "$WB_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK" \
            --json "$dir/saved.json"
        TGT_PID=$APP_PID
        local out
        out=$(checker "$dir" "$port" verify N0n1 "$dir/acks" all) || {
            echo "mode $mode: data lost across save_config and restart: $out" >&2
            tail -n 20 "$dir/check.log" >&2
            return 1
        }
        echo "  mode $mode: $(grep -o 'acknowledged=[0-9]*' "$dir/write.out") writes; after restart from save_config: ${out##*: }"
        stop_app "$TGT_PID" "$dir/tgt.sock"
    done
}

# wait_for_acks LOG WRITES FLUSHES — until the writer has logged that many
# acknowledged writes and completed flushes (at most 15 s: a slow start must
# not turn into a vacuous test, which the callers check afterwards).
wait_for_acks() {
    local i w f
    for i in $(seq 1 150); do
        w=$(grep -c '^W' "$1" 2>/dev/null || true)
        f=$(grep -c '^F' "$1" 2>/dev/null || true)
        [ "${w:-0}" -ge "$2" ] && [ "${f:-0}" -ge "$3" ] && return 0
        sleep 0.1
    done
}

# 3. kill -9 under load; everything acknowledged as durable reads back.
test_crash() {
    local mode
    for mode in 0 1; do
        local dir=$WORK/crash$mode port=$((PORT_BASE + 20 + mode))
        tgt_setup "$dir" "$mode" "$port"
        rpc "$dir/tgt.sock" save_config >"$dir/saved.json"
        # Mode 0 promises durability at FLUSH (one per 64 writes); mode 1 at every ack.
        checker "$dir" "$port" write N0n1 "$dir/acks" 32768 20 64 $((11 + mode)) >"$dir/write.out" 2>&1 &
        local cpid=$!
        wait_for_acks "$dir/acks" 2000 4
        rpc "$dir/tgt.sock" bdev_writeboost_get_stats -n wb0 >"$dir/stats-at-kill.json" 2>&1 || true
        kill -9 "$TGT_PID"
        wait "$TGT_PID" 2>/dev/null || true
        wait "$cpid" || true
        start_app "$dir/tgt2.log" "$dir/tgt.sock" "$WB_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK" \
            --json "$dir/saved.json"
        TGT_PID=$APP_PID
        local which=flushed
        [ "$mode" = 1 ] && which=all
        local out
        out=$(checker "$dir" "$port" verify N0n1 "$dir/acks" "$which") || {
            echo "mode $mode: acknowledged data lost after kill -9: $out" >&2
            tail -n 20 "$dir/check.log" >&2
            return 1
        }
        local acked flushes
        acked=$(grep -c '^W' "$dir/acks" || true)
        flushes=$(grep -c '^F' "$dir/acks" || true)
        if [ "$acked" -lt 1000 ] || { [ "$mode" = 0 ] && [ "$flushes" -lt 2 ]; }; then
            echo "mode $mode: too little was written before the kill ($acked writes, $flushes flushes)" >&2
            return 1
        fi
        echo "  mode $mode: kill -9 after $acked acknowledged writes ($flushes flushes); verify $which: ${out##*: }"
        stop_app "$TGT_PID" "$dir/tgt.sock"
    done
}

# Hot remove of the cache bdev under load: the writeboost bdev goes away,
# the target keeps serving, and a later create over the same files recovers
# everything acknowledged before a completed FLUSH.
test_hotremove() {
    local dir=$WORK/hotremove port=$((PORT_BASE + 40))
    tgt_setup "$dir" 0 "$port"
    local s=$dir/tgt.sock
    checker "$dir" "$port" write N0n1 "$dir/acks" 32768 20 64 17 >"$dir/write.out" 2>&1 &
    local cpid=$!
    wait_for_acks "$dir/acks" 2000 4
    rpc "$s" bdev_aio_delete Cache0 >/dev/null
    wait "$cpid" || true
    rpc "$s" spdk_get_version >/dev/null
    if rpc "$s" bdev_get_bdevs -b wb0 >/dev/null 2>&1; then
        echo "wb0 still registered after its cache bdev was removed" >&2
        return 1
    fi
    rpc "$s" bdev_aio_create "$dir/cache.img" Cache0 4096 >/dev/null
    rpc "$s" bdev_writeboost_create -n wb0 -b Back0 -c Cache0 >/dev/null
    rpc "$s" nvmf_subsystem_add_ns "$NQN" wb0 >/dev/null
    local out
    out=$(checker "$dir" "$port" verify N0n1 "$dir/acks" flushed) || {
        echo "acknowledged data lost after hot remove: $out" >&2
        tail -n 20 "$dir/check.log" >&2
        return 1
    }
    echo "  cache bdev removed under load after $(grep -c '^W' "$dir/acks") acknowledged writes; target kept serving; re-created: ${out##*: }"
    stop_app "$TGT_PID" "$s"
}

# 4. Export over NVMe-oF/TCP from a stock spdk_tgt with the module preloaded;
# bdevperf verify through SPDK's NVMe/TCP initiator.
test_nvmf() {
    local dir=$WORK/nvmf port=$((PORT_BASE + 30))
    mkdir -p "$dir"
    start_app "$dir/tgt.log" "$dir/tgt.sock" env LD_PRELOAD="$WB_LIB" "$SPDK_TGT" \
        "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK"
    local s=$dir/tgt.sock
    rpc "$s" bdev_malloc_create -b Cache0 64 4096 >/dev/null
    rpc "$s" bdev_malloc_create -b Back0 256 4096 >/dev/null
    rpc "$s" bdev_writeboost_create -n wb0 -b Back0 -c Cache0 >/dev/null
    nvmf_export "$s" "$port" wb0
    initiator_config "$port" >"$dir/initiator.json"
    if ! env LD_PRELOAD="$WB_LIB" "$BDEVPERF" "${SPDK_APP_ARGS[@]}" -s 1024 -m 0x2 \
        -r "$dir/perf.sock" -c "$dir/initiator.json" -T N0n1 -q 32 -o 4096 -w verify -t 4 \
        >"$dir/bdevperf.log" 2>&1; then
        echo "bdevperf over NVMe/TCP failed:" >&2
        tail -n 30 "$dir/bdevperf.log" >&2
        return 1
    fi
    local iops
    iops=$(bdevperf_iops "$dir/bdevperf.log" N0n1)
    [ -n "$iops" ] || { echo "no bdevperf result" >&2; tail -n 30 "$dir/bdevperf.log" >&2; return 1; }
    echo "  bdevperf verify over NVMe/TCP (stock spdk_tgt + LD_PRELOAD): ${iops} IOPS, no errors"
    stop_app "$APP_PID" "$s"
}

# 5. Export over vhost-user-blk: spdk_tgt serves wb0 as a vhost-blk
# controller, bdevperf attaches to it as a virtio-user initiator (as QEMU's
# vhost-user-blk-pci would) and runs verify. The initiator's memory is what
# vhost-user shares with the target (as a VM's is), so it must be hugepages
# with a file per segment (-g); the target maps it and needs none itself.
test_vhost() {
    local dir=$WORK/vhost
    mkdir -p "$dir"
    local hugepages_before
    hugepages_before=$(cat /proc/sys/vm/nr_hugepages)
    if ! hugepages_ready 1536; then
        echo "  SKIPPED vhost: needs 1536 free 2 MiB hugepages (as root: echo 1536 > /proc/sys/vm/nr_hugepages)"
        return 0
    fi
    truncate -s 256M "$dir/cache.img"
    truncate -s 1G "$dir/backing.img"
    # vhost-user sockets go in -S DIR.
    start_app "$dir/tgt.log" "$dir/tgt.sock" "$WB_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK" -S "$dir"
    local s=$dir/tgt.sock
    rpc "$s" bdev_aio_create "$dir/cache.img" Cache0 4096 >/dev/null
    rpc "$s" bdev_aio_create "$dir/backing.img" Back0 4096 >/dev/null
    rpc "$s" bdev_writeboost_create -n wb0 -b Back0 -c Cache0 >/dev/null
    # The bdev's block size is its backing bdev's, which the engine accepts.
    local bs
    bs=$(rpc "$s" bdev_get_bdevs -b wb0 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["block_size"])')
    [ "$bs" = 4096 ] || { echo "wb0 over 4096-byte bdevs has block_size $bs" >&2; return 1; }
    rpc "$s" vhost_create_blk_controller vhost.0 wb0 >/dev/null
    [ -S "$dir/vhost.0" ] || { echo "no vhost-user socket at $dir/vhost.0" >&2; return 1; }
    printf '{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"VirtioBlk0","trtype":"user","traddr":"%s","dev_type":"blk","vq_count":2,"vq_size":512}}]}]}\n' \
        "$dir/vhost.0" >"$dir/virtio.json"
    # -g: one file per hugepage segment, which vhost-user needs to share memory.
    if ! "$BDEVPERF" --no-pci --disable-cpumask-locks -g -s 1536 -m 0x2 -r "$dir/perf.sock" -c "$dir/virtio.json" \
        -T VirtioBlk0 -q 32 -o 4096 -w verify -t 4 >"$dir/bdevperf.log" 2>&1; then
        echo "bdevperf over vhost-user-blk failed:" >&2
        tail -n 30 "$dir/bdevperf.log" >&2
        return 1
    fi
    local iops
    iops=$(bdevperf_iops "$dir/bdevperf.log" VirtioBlk0)
    if [ -z "$iops" ] || grep -qiE "miscompare|io error|failed" "$dir/bdevperf.log"; then
        echo "bdevperf over vhost-user-blk: errors or no result" >&2
        tail -n 30 "$dir/bdevperf.log" >&2
        return 1
    fi
    rpc "$s" vhost_delete_controller vhost.0 >/dev/null
    echo "  bdevperf verify over vhost-user-blk (virtio-user, 2 queues, wb0 block_size 4096): ${iops} IOPS, no errors"
    stop_app "$APP_PID" "$s"
    # Give back the hugepages reserved here.
    echo "$hugepages_before" >/proc/sys/vm/nr_hugepages 2>/dev/null || true
}

# Whether N free 2 MiB hugepages are available, reserving them as root.
hugepages_ready() {
    local want=$1 free
    free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
    if [ "${free:-0}" -lt "$want" ] && [ "$(id -u)" = 0 ]; then
        local total
        total=$(cat /proc/sys/vm/nr_hugepages)
        echo $((total + want - ${free:-0})) >/proc/sys/vm/nr_hugepages 2>/dev/null || true
        free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
    fi
    if ! grep -q hugetlbfs /proc/mounts && [ "$(id -u)" = 0 ]; then
        mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null || true
    fi
    [ "${free:-0}" -ge "$want" ] && grep -q hugetlbfs /proc/mounts
}

# 6. A remote backing device: the backing bdev is a namespace that a second
# spdk_tgt (the "storage" target) exports over NVMe/TCP, as disaggregated
# storage would. In each mode: kill -9 the writeboost target under load and
# restart it from its saved config; everything acknowledged (mode 1) or
# flushed (mode 0) reads back. Then, in mode 0: kill -9 the storage target
# while writeback runs, restart it; writeback resumes, its errors are
# counted, and every flushed write reaches the backing device.
REMOTE_NQN=nqn.2016-06.io.spdk:writeboost-backing

# The storage target shares the second core with the checker, so it takes
# no core lock.
storage_start() { # DIR PORT
    start_app "$1/storage.log" "$1/storage.sock" "$SPDK_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m 0x2 \
        --disable-cpumask-locks
    STORAGE_PID=$APP_PID
    local s=$1/storage.sock
    rpc "$s" bdev_aio_create "$1/backing.img" Back0 4096 >/dev/null
    nvmf_export "$s" "$2" Back0 "$REMOTE_NQN" WBBACK000000001
}

# stat_of SOCK FIELD — a number from bdev_writeboost_get_stats wb0 (stats or status).
stat_of() {
    rpc "$1" bdev_writeboost_get_stats -n wb0 | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d[0] if isinstance(d, list) else d
f = sys.argv[1]
print(d["stats"][f] if f in d["stats"] else d["status"][f])' "$2"
}

test_remote() {
    local mode
    for mode in 0 1; do
        local dir=$WORK/remote$mode port=$((PORT_BASE + 50 + 2 * mode)) sport=$((PORT_BASE + 51 + 2 * mode))
        mkdir -p "$dir"
        truncate -s 256M "$dir/cache.img"
        truncate -s 1G "$dir/backing.img"
        local pool=$POOLS/remote$mode
        make_pool "$pool" 64M
        storage_start "$dir" "$sport"
        start_app "$dir/tgt.log" "$dir/tgt.sock" "$WB_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK"
        TGT_PID=$APP_PID
        local s=$dir/tgt.sock
        # FLUSH must reach the storage target (enable_flush); a lost
        # connection is retried every second for ever, and I/O fails after
        # 2 s so that writeback notices, counts it and retries.
        rpc "$s" bdev_nvme_set_options --enable-flush >/dev/null
        rpc "$s" bdev_nvme_attach_controller -b Remote -t tcp -a 127.0.0.1 -f ipv4 -s "$sport" \
            -n "$REMOTE_NQN" -l -1 -o 1 -u 2 >/dev/null
        rpc "$s" bdev_aio_create "$dir/cache.img" Cache0 4096 >/dev/null
        wb_create "$s" Remoten1 "$mode" "$pool"
        nvmf_export "$s" "$port" wb0
        rpc "$s" save_config >"$dir/saved.json"
        checker "$dir" "$port" write N0n1 "$dir/acks" 32768 20 64 $((23 + mode)) >"$dir/write.out" 2>&1 &
        local cpid=$!
        wait_for_acks "$dir/acks" 2000 4
        kill -9 "$TGT_PID"
        wait "$TGT_PID" 2>/dev/null || true
        wait "$cpid" || true
        start_app "$dir/tgt2.log" "$s" "$WB_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK" --json "$dir/saved.json"
        TGT_PID=$APP_PID
        local which=flushed
        [ "$mode" = 1 ] && which=all
        local out acked
        out=$(checker "$dir" "$port" verify N0n1 "$dir/acks" "$which") || {
            echo "mode $mode, remote backing: acknowledged data lost after kill -9: $out" >&2
            tail -n 20 "$dir/check.log" >&2
            return 1
        }
        acked=$(grep -c '^W' "$dir/acks" || true)
        [ "$acked" -ge 1000 ] || { echo "too little written before the kill ($acked writes)" >&2; return 1; }
        echo "  mode $mode, backing over NVMe/TCP: kill -9 of the writeboost target after $acked acknowledged writes; verify $which: ${out##*: }"
        [ "$mode" = 0 ] || { stop_app "$TGT_PID" "$s"; stop_app "$STORAGE_PID" "$dir/storage.sock"; continue; }

        # The storage target dies while writeback runs: writeback starts as
        # soon as a log is durable and runs whatever the load, and the
        # writer keeps going throughout.
        rpc "$s" bdev_writeboost_set_options wb0 --writeback-delay-ms 0 --writeback-threshold 100 >/dev/null
        local errors0 wb0_cmds i
        errors0=$(stat_of "$s" writeback_errors)
        wb0_cmds=$(stat_of "$s" backing_write_cmds)
        checker "$dir" "$port" write N0n1 "$dir/acks2" 32768 10 64 31 >"$dir/write2.out" 2>&1 &
        cpid=$!
        for i in $(seq 1 150); do
            [ "$(stat_of "$s" backing_write_cmds)" -gt $((wb0_cmds + 1000)) ] && break
            sleep 0.1
        done
        local wb_cmds
        wb_cmds=$(stat_of "$s" backing_write_cmds)
        [ "$wb_cmds" -gt $((wb0_cmds + 1000)) ] || { echo "writeback did not start under load" >&2; return 1; }
        kill -9 "$STORAGE_PID"
        wait "$STORAGE_PID" 2>/dev/null || true
        local errors=$errors0
        for i in $(seq 1 100); do
            errors=$(stat_of "$s" writeback_errors)
            [ "$errors" -gt "$errors0" ] && break
            sleep 0.1
        done
        if [ "$errors" -le "$errors0" ]; then
            echo "writeback errors were not counted while the storage target was down" >&2
            rpc "$s" bdev_writeboost_get_stats -n wb0 >&2
            return 1
        fi
        local dirty_down
        dirty_down=$(stat_of "$s" nr_dirty_blocks)
        storage_start "$dir" "$sport"
        wait "$cpid" || { echo "the writer failed while the storage target was down:" >&2; cat "$dir/write2.out" >&2; return 1; }
        rpc "$s" bdev_writeboost_drop_caches wb0 >/dev/null
        for i in $(seq 1 600); do
            [ "$(stat_of "$s" nr_dirty_blocks)" = 0 ] && break
            sleep 0.1
        done
        [ "$(stat_of "$s" nr_dirty_blocks)" = 0 ] || {
            echo "writeback did not resume after the storage target came back ($(stat_of "$s" nr_dirty_blocks) dirty blocks)" >&2
            return 1
        }
        errors=$(stat_of "$s" writeback_errors)
        stop_app "$TGT_PID" "$s"
        # Everything flushed is on the backing device itself: read the
        # storage target's namespace directly.
        out=$(CHECK_NQN=$REMOTE_NQN checker "$dir" "$sport" verify N0n1 "$dir/acks2" flushed) || {
            echo "flushed data missing from the backing device after writeback resumed: $out" >&2
            tail -n 20 "$dir/check.log" >&2
            return 1
        }
        echo "  storage target killed mid-writeback ($((wb_cmds - wb0_cmds)) writeback writes done, $dirty_down blocks dirty) under a writer that kept going ($(grep -c '^W' "$dir/acks2") acknowledged writes); restarted: writeback resumed ($((errors - errors0)) errors counted), all written back; backing device verify flushed: ${out##*: }"
        stop_app "$STORAGE_PID" "$dir/storage.sock"
    done
}

# expect_error SOCK PATTERN METHOD ARGS... — the call must fail with a message matching PATTERN.
expect_error() {
    local sock=$1 pat=$2
    shift 2
    local out
    if out=$(rpc "$sock" "$@" 2>&1); then
        echo "expected an error from: $* ; got: $out" >&2
        return 1
    fi
    if ! grep -qiE "$pat" <<<"$out"; then
        echo "error from '$*' does not say '$pat': $out" >&2
        return 1
    fi
    echo "    refused: $1: $(grep -o '"message": .*' <<<"$out" | head -n 1)"
}

# Raw JSON-RPC, for requests rpc.py would refuse to send.
raw_rpc() { # SOCK JSON
    python3 - "$1" "$2" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode())
s.settimeout(10)
buf = b""
while True:
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    if not chunk:
        break
    buf += chunk
    try:
        import json
        json.loads(buf)
        break
    except ValueError:
        continue
print(buf.decode())
EOF
}

# 7. Bad input: each returns an error, nothing is overwritten, the target serves on.
test_badinput() {
    local dir=$WORK/bad
    mkdir -p "$dir"
    make_pool "$POOLS/bad" 64M
    start_app "$dir/tgt.log" "$dir/tgt.sock" "$WB_TGT" "${SPDK_APP_ARGS[@]}" -s 2048 -m "$TGT_MASK"
    local s=$dir/tgt.sock
    local b
    for b in Cache0 Cache1 Back0 Back1; do
        rpc "$s" bdev_malloc_create -b "$b" 64 4096 >/dev/null
    done
    rpc "$s" bdev_writeboost_create -n wb0 -b Back0 -c Cache0 >/dev/null
    # Wrong types, missing and unknown parameters.
    local r
    r=$(raw_rpc "$s" '{"jsonrpc":"2.0","id":1,"method":"bdev_writeboost_create","params":{"name":"x","backing_bdev":"Back1","cache_bdev":"Cache1","mode":"fast"}}')
    grep -q '"code": *-32602' <<<"$r" && grep -q 'mode' <<<"$r" || { echo "mode as a string: $r" >&2; return 1; }
    r=$(raw_rpc "$s" '{"jsonrpc":"2.0","id":2,"method":"bdev_writeboost_create","params":{"name":"x","cache_bdev":"Cache1"}}')
    grep -q '"code": *-32602' <<<"$r" && grep -q 'backing_bdev' <<<"$r" || { echo "missing backing_bdev: $r" >&2; return 1; }
    r=$(raw_rpc "$s" '{"jsonrpc":"2.0","id":3,"method":"bdev_writeboost_set_options","params":{"name":"wb0","no_such_tunable":1}}')
    grep -q '"code": *-32602' <<<"$r" && grep -q 'no_such_tunable' <<<"$r" || { echo "unknown tunable: $r" >&2; return 1; }
    r=$(raw_rpc "$s" '{"jsonrpc":"2.0","id":4,"method":"bdev_writeboost_create","params":{"name":"x","backing_bdev":"Back1","cache_bdev":"Cache1","mode":2}}')
    grep -q '"code": *-32602' <<<"$r" || { echo "mode 2: $r" >&2; return 1; }
    # Missing bdevs, claimed bdevs, a taken name, unknown names.
    expect_error "$s" "NoSuch" bdev_writeboost_create -n wb1 -b Back1 -c NoSuch
    expect_error "$s" "claim|in use|already" bdev_writeboost_create -n wb1 -b Back1 -c Cache0
    expect_error "$s" "claim|in use|already" bdev_writeboost_create -n wb1 -b Back0 -c Cache1
    expect_error "$s" "exist|already" bdev_writeboost_create -n wb0 -b Back1 -c Cache1
    expect_error "$s" "pmem|pool" bdev_writeboost_create -n wb1 -b Back1 -c Cache1 -m 1 -p "$dir/missing-pool"
    expect_error "$s" "core=9 is not one of the target's cores" bdev_writeboost_create -n wb1 -b Back1 -c Cache1 --core 9
    expect_error "$s" "io_core|core=9" bdev_writeboost_create -n wb1 -b Back1 -c Cache1 --io-core 9
    expect_error "$s" "nosuch" bdev_writeboost_delete nosuch
    expect_error "$s" "nosuch" bdev_writeboost_get_stats -n nosuch
    expect_error "$s" "nosuch" bdev_writeboost_drop_caches nosuch
    expect_error "$s" "nosuch" bdev_writeboost_clear_stats nosuch
    expect_error "$s" "nosuch" bdev_writeboost_get_quarantine nosuch
    expect_error "$s" "not quarantined" bdev_writeboost_drop_quarantine wb0 7
    expect_error "$s" "nosuch" bdev_writeboost_set_options nosuch --barrier-deadline-ms 5
    # A cache that belongs to another backing device is refused and left as it is.
    rpc "$s" bdev_writeboost_delete wb0 >/dev/null
    expect_error "$s" "backing|belongs|format" bdev_writeboost_create -n wb1 -b Back1 -c Cache0
    rpc "$s" bdev_writeboost_create -n wb0 -b Back0 -c Cache0 >/dev/null || {
        echo "the refused cache could not be re-attached to its own backing device" >&2
        return 1
    }
    # The failed creates released what they claimed: Cache1 and Back1 are usable.
    rpc "$s" bdev_writeboost_create -n wb1 -b Back1 -c Cache1 -m 1 -p "$POOLS/bad" >/dev/null
    # With wait_for_bdevs a create names bdevs that do not exist yet and
    # completes when they appear.
    rpc "$s" bdev_writeboost_create -n wb2 -b Back2 -c Cache2 --wait-for-bdevs >/dev/null
    rpc "$s" bdev_malloc_create -b Cache2 64 4096 >/dev/null
    rpc "$s" bdev_malloc_create -b Back2 64 4096 >/dev/null
    rpc "$s" bdev_get_bdevs -b wb2 -t 10000 >/dev/null
    # And the target still serves.
    rpc "$s" bdev_writeboost_get_stats | python3 -c 'import json,sys; d=json.load(sys.stdin); assert len(d) == 3, d'
    rpc "$s" bdev_get_bdevs -b wb1 >/dev/null
    # save_config keeps a core that was given.
    rpc "$s" bdev_writeboost_create -n wb3 -b Back3 -c Cache3 --wait-for-bdevs --core 1 --io-core 0 >/dev/null
    rpc "$s" bdev_malloc_create -b Cache3 64 4096 >/dev/null
    rpc "$s" bdev_malloc_create -b Back3 64 4096 >/dev/null
    rpc "$s" bdev_get_bdevs -b wb3 -t 10000 >/dev/null
    rpc "$s" save_subsystem_config -n bdev | python3 -c '
import json, sys
d = json.load(sys.stdin)
wb3 = [e for e in d["config"] if e["method"] == "bdev_writeboost_create" and e["params"]["name"] == "wb3"]
assert wb3 and wb3[0]["params"]["core"] == 1 and wb3[0]["params"]["io_core"] == 0, wb3
' || { echo "save_config lost wb3's core or io_core" >&2; return 1; }
    grep -q "wb3: online .* on core 1, base I/O on core 0" "$dir/tgt.log" || {
        echo "wb3 is not on core 1 with its base I/O on core 0:" >&2
        grep wb3 "$dir/tgt.log" >&2
        return 1
    }
    echo "  bad input: 18 cases refused with errors, nothing overwritten; a waiting create completed; target still serving"
    stop_app "$APP_PID" "$s"
}

TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(verify restart crash hotremove nvmf vhost remote badinput)
failed=0
for t in "${TESTS[@]}"; do
    echo "spdk test $t"
    # A subshell per test, so errexit holds inside it and its processes go with it.
    set +e
    (
        trap spdk_cleanup EXIT
        set -e
        "test_$t"
    )
    rc=$?
    set -e
    if [ $rc = 0 ]; then
        echo "PASS $t"
    else
        echo "FAIL $t"
        failed=1
    fi
done
exit $failed
