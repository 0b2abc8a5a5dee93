# Shared helpers of the SPDK tests and benchmarks: find SPDK, build the
# module, start and stop targets, call RPCs. Sourced, not run.
#
# SPDK is found through SPDK_DIR (a built source tree or an install prefix)
# or pkg-config (spdk_bdev). Callers check `spdk_locate` and skip when it fails.

WB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Memory and devices for every SPDK process: no hugepages, no PCI, small
# heap; and no core lock files, since a target on two cores and its test
# client share a core.
SPDK_APP_ARGS=(--no-huge --no-pci --disable-cpumask-locks)
SPDK_PIDS=()

spdk_locate() {
    local root=""
    if [ -n "${SPDK_DIR:-}" ]; then
        root=$SPDK_DIR
    elif command -v pkg-config >/dev/null && pkg-config --exists spdk_bdev 2>/dev/null; then
        root=$(pkg-config --variable=prefix spdk_bdev)
    else
        return 1
    fi
    [ -d "$root" ] || return 1
    SPDK_ROOT=$(cd "$root" && pwd)
    local c
    SPDK_TGT="" BDEVPERF="" RPC_PY="" BDEVPERF_PY=""
    for c in "$SPDK_ROOT/build/bin/spdk_tgt" "$SPDK_ROOT/bin/spdk_tgt"; do
        [ -x "$c" ] && SPDK_TGT=$c && break
    done
    for c in "$SPDK_ROOT/build/examples/bdevperf" "$SPDK_ROOT/bin/bdevperf"; do
        [ -x "$c" ] && BDEVPERF=$c && break
    done
    for c in "$SPDK_ROOT/scripts/rpc.py" "$SPDK_ROOT/bin/spdk_rpc.py" "$(command -v spdk-rpc || true)"; do
        [ -n "$c" ] && [ -f "$c" ] && RPC_PY=$c && break
    done
    for c in "$SPDK_ROOT/examples/bdev/bdevperf/bdevperf.py" "$SPDK_ROOT/bin/bdevperf.py"; do
        [ -f "$c" ] && BDEVPERF_PY=$c && break
    done
    if [ -z "$SPDK_TGT" ] || [ -z "$BDEVPERF" ] || [ -z "$RPC_PY" ]; then
        echo "SPDK at $SPDK_ROOT lacks spdk_tgt, bdevperf or rpc.py (was it built?)" >&2
        return 1
    fi
    # Shared libraries of a source-tree build (an installed prefix has them in lib/).
    local d libs=""
    for d in build/lib dpdk/build/lib isa-l/.libs isa-l-crypto/.libs lib; do
        [ -d "$SPDK_ROOT/$d" ] && libs="$libs:$SPDK_ROOT/$d"
    done
    export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONPATH="$WB_ROOT/rpc:$SPDK_ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
    export SPDK_DIR=$SPDK_ROOT
    return 0
}

# Whether libclang, which bindgen needs to read SPDK's headers, is here.
have_libclang() {
    [ -n "${LIBCLANG_PATH:-}" ] && return 0
    # libclang.so* or libclang-N.so*; libclang-cpp (LLVM's C++ library) is not it.
    local d
    for d in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
        compgen -G "$d/libclang.so*" >/dev/null && return 0
        compgen -G "$d/libclang-[0-9]*.so*" >/dev/null && return 0
    done
    return 1
}

# Builds libbdev_writeboost.so, writeboost_tgt and wb_ack_check.
spdk_build_module() {
    if ! have_libclang; then
        echo "SPDK module: bindgen needs libclang to read SPDK's headers and none is installed:" \
            "apt-get install libclang-dev (or set LIBCLANG_PATH to the directory holding libclang.so)" >&2
        exit 1
    fi
    # SPDK_SYS_REQUIRE_SURFACE: fail if spdk-sys/src/surface.rs, which CI
    # type-checks the glue against, is not what this SPDK's headers give.
    (cd "$WB_ROOT" && SPDK_SYS_REQUIRE_SURFACE=1 cargo build --release -q -p bdev_writeboost --features spdk \
        -p wb_ack_check --features wb_ack_check/spdk)
    WB_LIB="$WB_ROOT/target/release/libbdev_writeboost.so"
    WB_TGT="$WB_ROOT/target/release/writeboost_tgt"
    WB_CHECK="$WB_ROOT/target/release/wb_ack_check"
}

# rpc SOCK METHOD ARGS... — SPDK's rpc.py with the writeboost plugin.
rpc() {
    local sock=$1
    shift
    python3 "$RPC_PY" -s "$sock" -t 30 --plugin writeboost_rpc "$@"
}

# start_app LOG SOCK CMD... — starts an SPDK application in the background
# and waits until its RPC server answers. Sets APP_PID.
start_app() {
    local log=$1 sock=$2
    shift 2
    rm -f "$sock"
    "$@" -r "$sock" >"$log" 2>&1 &
    APP_PID=$!
    SPDK_PIDS+=("$APP_PID")
    local i
    for i in $(seq 1 300); do
        if ! kill -0 "$APP_PID" 2>/dev/null; then
            echo "application exited during start-up; its log ($log):" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        if [ -S "$sock" ] && python3 "$RPC_PY" -s "$sock" -t 2 spdk_get_version >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "application did not answer RPC within 30 s; its log ($log):" >&2
    tail -n 30 "$log" >&2
    return 1
}

# stop_app PID SOCK — asks for a clean shutdown and waits for the exit status.
stop_app() {
    local pid=$1 sock=$2
    rpc "$sock" spdk_kill_instance SIGTERM >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    local rc=0
    wait "$pid" || rc=$?
    return $rc
}

spdk_cleanup() {
    local p
    for p in "${SPDK_PIDS[@]}"; do
        kill -9 "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}

# A bdevperf JSON config: the bdev subsystem with the given method entries
# (each a JSON object), then bdev_wait_for_examine.
bdev_config() {
    local entries=""
    local e
    for e in "$@"; do
        entries="$entries$e,"
    done
    printf '{"subsystems":[{"subsystem":"bdev","config":[%s{"method":"bdev_wait_for_examine"}]}]}\n' "$entries"
}

malloc_entry() { # NAME NUM_BLOCKS BLOCK_SIZE
    printf '{"method":"bdev_malloc_create","params":{"name":"%s","num_blocks":%s,"block_size":%s}}' "$1" "$2" "$3"
}

wb_entry() { # NAME CACHE BACKING MODE [PMEM_PATH] [EXTRA_PARAMS e.g. "barrier_deadline_ms":0]
    local pmem="" extra=""
    [ -n "${5:-}" ] && pmem=",\"pmem_path\":\"$5\""
    [ -n "${6:-}" ] && extra=",$6"
    printf '{"method":"bdev_writeboost_create","params":{"name":"%s","cache_bdev":"%s","backing_bdev":"%s","mode":%s%s%s}}' \
        "$1" "$2" "$3" "$4" "$pmem" "$extra"
}

# Where pmem pool files go: WB_POOL_DIR, else /dev/shm. tmpfs stands in for
# persistent memory here: it survives the process (kill -9 included) but not
# power loss, and msync, which persists a pool that is not DAX, is nearly free
# on it, as cache flushes are on real pmem. A pool on a disk filesystem is just
# as safe but pays a page write-out per persist.
pool_dir() {
    local d=${WB_POOL_DIR:-/dev/shm}
    [ -d "$d" ] && [ -w "$d" ] || d=${TMPDIR:-/tmp}
    mktemp -d "$d/wb-pool.XXXXXX"
}

# bench_setup NAME — what every SPDK benchmark shares, so their runs compare:
# the module built, T (SECONDS_PER_RUN, default 5), WORK and POOLS (removed
# on exit with every SPDK process), and the base bdevs CACHE (512 MiB) and
# BACK (256 MiB of user data: the whole working set fits in the cache).
bench_setup() {
    spdk_build_module
    T=${SECONDS_PER_RUN:-5}
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/wb-spdk-$1.XXXXXX")
    POOLS=$(pool_dir)
    trap 'spdk_cleanup; rm -rf "$WORK" "$POOLS"' EXIT
    CACHE=$(malloc_entry Cache0 131072 4096)
    BACK=$(malloc_entry Back0 65536 4096)
}

# A pmem pool file of SIZE (e.g. 64M), zeroed.
make_pool() {
    rm -f "$1"
    truncate -s "$2" "$1"
}

# bdevperf_run LOG ARGS... — runs bdevperf with the module preloaded, on
# the cores of BDEVPERF_MASK (default one core, 0x1); prints the log on failure.
bdevperf_run() {
    local log=$1
    shift
    if ! env LD_PRELOAD="$WB_LIB" "$BDEVPERF" "${SPDK_APP_ARGS[@]}" -s 4096 -m "${BDEVPERF_MASK:-0x1}" "$@" >"$log" 2>&1; then
        echo "bdevperf failed; its log ($log):" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
}

# IOPS of bdev $2 in bdevperf log $1 (its "NAME : runtime IOPS ..." result
# rows, summed: with -C each core has one).
bdevperf_iops() {
    awk -v b="$2" '$1 == b && $2 == ":" { v += $4; n++ } END { if (n) printf "%.0f\n", v }' "$1"
}

# fio_plugin_locate WHAT — finds SPDK, its fio bdev plugin and the fio binary
# (FIO, else fio on PATH), setting SPDK_ROOT, PLUGIN and FIO; otherwise says
# why WHAT is SKIPPED and returns 1.
fio_plugin_locate() {
    local what=$1 c
    if ! spdk_locate; then
        echo "SKIPPED: $what: SPDK not found (set SPDK_DIR to a built SPDK, or install it for pkg-config)"
        return 1
    fi
    PLUGIN=""
    for c in "$SPDK_ROOT/build/fio/spdk_bdev" "$SPDK_ROOT/lib/spdk_bdev" "$SPDK_ROOT/bin/spdk_bdev"; do
        [ -f "$c" ] && PLUGIN=$c && break
    done
    if [ -z "$PLUGIN" ]; then
        echo "SKIPPED: $what: SPDK at $SPDK_ROOT was built without fio's plugin (configure --with-fio=<fio source tree>)"
        return 1
    fi
    FIO=${FIO:-$(command -v fio || true)}
    if [ -z "$FIO" ] || [ ! -x "$FIO" ]; then
        echo "SKIPPED: $what: no fio binary (set FIO to the fio built from the tree SPDK's plugin was built against)"
        return 1
    fi
}
