#!/usr/bin/env bash
# fio through SPDK's bdev plugin (ioengine=spdk_bdev) over a slow backing
# device, side by side in one run:
#   backing alone (passthru) | OCF write-back | writeboost mode 0 | writeboost mode 1
# The backing device is a malloc bdev behind bdev_delay (write 2 ms, read
# 4 ms on average, twice that at p99) and a QoS limit (2000 IOPS, 200 MB/s);
# the cache is a malloc bdev. Each target gets its own fio process (fresh
# bdevs) running three 4 KiB jobs one after the other (stonewall), so each
# starts from the state the previous one left:
#   burst      randwrite, QD 32, over the first BURST_MIB (half the cache)
#   sustained  randwrite, QD 32, over the whole device, far more than the cache
#   zipf       randrw 70 % reads, zipf:ZIPF_THETA, QD 16, on the cache the
#              sustained job left full
# Reported per target and job: IOPS, p99 and p99.9 completion latency, the
# lowest one-second IOPS of the sustained job, and the cache write
# amplification (bytes written to the cache bdev / bytes the job wrote to the
# top bdev, from bdev_get_iostat before and after each job); then the ratios
# the writeboost modes are judged by. The raw fio JSON, the iostat samples and
# writeboost's final bdev_writeboost_get_stats are kept in the work directory.
#
#   SPDK_DIR=/opt/spdk FIO=/opt/fio/fio bash test/spdk/bench-slow.sh
#
# SPDK must have been configured --with-fio=<fio source tree>, and FIO must
# be the fio built from that tree (the plugin is built against its headers).
# Knobs (defaults): CACHE_MIB (256), BACKING_MIB (2048), WRITE_LAT_US (2000),
# READ_LAT_US (4000), QOS_IOPS (2000; 0 = none, else a multiple of 1000),
# QOS_MBPS (200; 0 = none), QD_BURST (32), BURST_MIB (128), BURST_S (10),
# SUSTAINED_S (60), ZIPF_S (10), ZIPF_THETA (1.2), WB_PARAMS (extra
# bdev_writeboost_create parameters for both modes, e.g. '"clean_max_live_pct":30'), SPDK_MEM (MiB of SPDK
# memory, default CACHE_MIB + BACKING_MIB + 1280), KEEP_WORK (1 keeps the work
# directory). The default run takes about 7 minutes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

fio_plugin_locate "slow-backing fio benchmark" || exit 0

CACHE_MIB=${CACHE_MIB:-256}
BACKING_MIB=${BACKING_MIB:-2048}
WRITE_LAT_US=${WRITE_LAT_US:-2000}
READ_LAT_US=${READ_LAT_US:-4000}
QOS_IOPS=${QOS_IOPS:-2000}
QOS_MBPS=${QOS_MBPS:-200}
QD_BURST=${QD_BURST:-32}
BURST_MIB=${BURST_MIB:-128}
BURST_S=${BURST_S:-10}
SUSTAINED_S=${SUSTAINED_S:-60}
ZIPF_S=${ZIPF_S:-10}
ZIPF_THETA=${ZIPF_THETA:-1.2}
# In --no-huge mode the malloc bdevs come out of SPDK's memory, beside the
# bdev_io and iobuf pools: a 2 GiB malloc bdev alone needs spdk_mem=3072.
SPDK_MEM=${SPDK_MEM:-$((CACHE_MIB + BACKING_MIB + 1280))}

bench_setup slow
trap 'spdk_cleanup; rm -rf "$POOLS"; [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"' EXIT

CACHE=$(malloc_entry Cache0 $((CACHE_MIB * 256)) 4096)
BACK=$(malloc_entry Back0 $((BACKING_MIB * 256)) 4096)
# bdev_delay latencies are in microseconds; the QoS limit applies to every
# I/O reaching Delay0, whoever sends it (passthru, OCF or writeboost).
DELAY=$(printf '{"method":"bdev_delay_create","params":{"base_bdev_name":"Back0","name":"Delay0","avg_read_latency":%s,"p99_read_latency":%s,"avg_write_latency":%s,"p99_write_latency":%s}}' \
    "$READ_LAT_US" $((2 * READ_LAT_US)) "$WRITE_LAT_US" $((2 * WRITE_LAT_US)))
QOS=$(printf '{"method":"bdev_set_qos_limit","params":{"name":"Delay0","rw_ios_per_sec":%s,"rw_mbytes_per_sec":%s}}' \
    "$QOS_IOPS" "$QOS_MBPS")

# Byte counts: fio's plugin serves RPC (spdk_rpc_listen_addr) and a sampler
# beside fio polls bdev_get_iostat every 100 ms, and for writeboost
# bdev_writeboost_get_stats every second and once the last job is over (the
# last answer is kept as WORK/NAME/wb-stats.json). A hook cannot ask SPDK
# itself: fio runs exec_prerun/exec_postrun on the job's thread, which is
# also the SPDK thread that must answer bdev_get_iostat's walk over the I/O
# channels, so the call would never end. So the hooks only note the time a
# job starts or ends, and then hold the job HOOK_PAUSE seconds, in which no
# user I/O runs and the sampler (which watches for the notes) asks again; the
# answer, given in the pause or held up until the job's thread goes on, is
# the count at that point, give or take the few I/Os a job starts before its
# thread first answers. When no such sample is found, the count is
# interpolated from the samples around and the amplification marked "~".
HOOK_PAUSE=0.5
SAMPLER=$WORK/sampler.py
cat >"$SAMPLER" <<'PY'
import json, os, socket, sys, time

sock_path, out_path, stats_path, last_end = sys.argv[1:5]
deadline = time.time() + 120
while True:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        break
    except OSError:
        s.close()
        if time.time() > deadline:
            sys.exit(f"sampler: no RPC server at {sock_path}")
        time.sleep(0.05)
buf, n = "", 0


def call(method, params=None):
    global buf, n
    n += 1
    req = {"jsonrpc": "2.0", "method": method, "id": n}
    if params:
        req["params"] = params
    s.sendall(json.dumps(req).encode())
    while True:
        try:
            buf = buf.lstrip()
            obj, end = json.JSONDecoder().raw_decode(buf)
            buf = buf[end:]
            return obj
        except ValueError:
            data = s.recv(65536)
            if not data:
                raise EOFError
            buf += data.decode()


def save_stats():
    r = call("bdev_writeboost_get_stats", {"name": "wb0"})
    if r.get("result"):
        with open(stats_path + ".tmp", "w") as f:
            json.dump(r["result"], f, indent=2)
        os.replace(stats_path + ".tmp", stats_path)
        return True
    return False


def marks():
    return {f for f in os.listdir(os.path.dirname(out_path)) if f.endswith((".start", ".end"))}


last_stats, final_stats, seen = 0.0, False, set()
with open(out_path, "w") as out:
    try:
        while True:
            sent = time.time()
            r = call("bdev_get_iostat")
            t = time.time()
            if "result" in r:  # an error until the bdev layer is up
                w = {d["name"]: d["bytes_written"] for d in r["result"]["bdevs"]}
                out.write(json.dumps({"sent": sent, "t": t, "written": w}) + "\n")
                out.flush()
                if stats_path != "-" and not final_stats:
                    if os.path.exists(last_end):
                        final_stats = save_stats()
                    elif t - last_stats >= 1 and save_stats():
                        last_stats = t
            # Every 100 ms, and at once when a hook notes a job's start or end.
            for _ in range(10):
                now = marks()
                if now - seen:
                    seen = now
                    break
                time.sleep(0.01)
    except (EOFError, OSError):
        pass  # fio has ended
PY

# fio runs its hooks through system(), so /bin/sh inherits fio's LD_PRELOAD,
# and the plugin, which needs fio's symbols, kills any other program it is
# preloaded into. Hence fio runs from a copy in WORK/bin beside links to the
# plugin and the module, and LD_PRELOAD names them by $ORIGIN (the directory
# of the running executable): sh finds nothing there, warns and goes on.
mkdir -p "$WORK/bin"
cp "$FIO" "$WORK/bin/fio"
ln -s "$PLUGIN" "$WORK/bin/spdk_bdev"
ln -s "$WB_LIB" "$WORK/bin/libbdev_writeboost.so"
# shellcheck disable=SC2016 # $ORIGIN is for ld.so
PRELOAD='$ORIGIN/spdk_bdev $ORIGIN/libbdev_writeboost.so'
# HOOK FILE: the time now, in seconds, into FILE; then the pause.
HOOK=$WORK/hook.sh
# shellcheck disable=SC2016 # $1 is the hook's
printf '#!/bin/sh\ndate +%%s.%%N >"$1"\nsleep %s\n' "$HOOK_PAUSE" >"$HOOK"
chmod +x "$HOOK"

# fio_run NAME TARGET_BDEV ENTRY... — the three jobs against TARGET_BDEV in
# one fio process, in WORK/NAME.
fio_run() {
    local name=$1 target=$2
    shift 2
    local dir=$WORK/$name stats=-
    mkdir -p "$dir"
    [ "$target" = wb0 ] && stats=$dir/wb-stats.json
    bdev_config "$@" >"$dir/bdevs.json"
    cat >"$dir/jobs.fio" <<JOB
[global]
ioengine=spdk_bdev
spdk_json_conf=$dir/bdevs.json
spdk_rpc_listen_addr=$dir/rpc.sock
env_context=--no-huge --no-pci --legacy-mem --iova-mode=va
spdk_mem=$SPDK_MEM
thread=1
direct=1
filename=$target
bs=4k
norandommap=1
randrepeat=0
percentile_list=50:99:99.9
time_based=1

[burst]
rw=randwrite
iodepth=$QD_BURST
size=${BURST_MIB}M
runtime=$BURST_S
exec_prerun=$HOOK $dir/burst.start
exec_postrun=$HOOK $dir/burst.end

[sustained]
stonewall
rw=randwrite
iodepth=32
runtime=$SUSTAINED_S
write_iops_log=$dir/sustained
log_avg_msec=1000
exec_prerun=$HOOK $dir/sustained.start
exec_postrun=$HOOK $dir/sustained.end

[zipf]
stonewall
rw=randrw
rwmixread=70
random_distribution=zipf:$ZIPF_THETA
iodepth=16
runtime=$ZIPF_S
exec_prerun=$HOOK $dir/zipf.start
exec_postrun=$HOOK $dir/zipf.end
JOB
    local limit=$((BURST_S + SUSTAINED_S + ZIPF_S + 300))
    rm -f "$dir/rpc.sock"
    timeout -k 10 "$limit" python3 "$SAMPLER" "$dir/rpc.sock" "$dir/iostat.jsonl" "$stats" "$dir/zipf.end" 2>"$dir/sampler.log" &
    local sampler=$!
    SPDK_PIDS+=("$sampler")
    # fio runs the hooks in its working directory and leaves their output
    # there. FIO_ENV is VAR=VALUE words for env.
    # shellcheck disable=SC2086
    if ! (cd "$dir" && timeout -k 10 "$limit" env LD_PRELOAD="$PRELOAD" ${FIO_ENV:-} "$WORK/bin/fio" \
        --output-format=json --output="$dir/fio.json" "$dir/jobs.fio" >"$dir/fio.log" 2>&1); then
        echo "$name: fio failed:" >&2
        tail -n 30 "$dir/fio.log" "$dir/fio.json" >&2
        exit 1
    fi
    if ! wait "$sampler"; then
        echo "$name: the bdev_get_iostat sampler failed:" >&2
        cat "$dir/sampler.log" >&2
        exit 1
    fi
    echo "$name: done"
}

echo "fio $("$FIO" --version) with SPDK's bdev plugin, 4 KiB; cache ${CACHE_MIB} MiB malloc;" \
    "backing ${BACKING_MIB} MiB malloc behind bdev_delay (write ${WRITE_LAT_US} us, read ${READ_LAT_US} us," \
    "p99 twice) and QoS ${QOS_IOPS} IOPS / ${QOS_MBPS} MB/s"
echo "jobs: burst randwrite QD ${QD_BURST} over ${BURST_MIB} MiB ${BURST_S} s; sustained randwrite QD 32 over" \
    "the whole device ${SUSTAINED_S} s; zipf:${ZIPF_THETA} randrw 70 % reads QD 16 ${ZIPF_S} s"
echo "work directory: $WORK"

run_start=$SECONDS
fio_run backing pt0 "$BACK" "$DELAY" "$QOS" \
    '{"method":"bdev_passthru_create","params":{"base_bdev_name":"Delay0","name":"pt0"}}'
fio_run ocf-wb ocf0 "$CACHE" "$BACK" "$DELAY" "$QOS" \
    '{"method":"bdev_ocf_create","params":{"name":"ocf0","mode":"wb","cache_bdev_name":"Cache0","core_bdev_name":"Delay0"}}'
fio_run wb-mode0 wb0 "$CACHE" "$BACK" "$DELAY" "$QOS" "$(wb_entry wb0 Cache0 Delay0 0 "" "${WB_PARAMS:-}")"
# Mode 1 as on DAX pmem: the pool is on tmpfs and libpmem2 is told to persist
# by CPU cache flushes, as it does on DAX (see bench.sh).
make_pool "$POOLS/pool" 64M
FIO_ENV=PMEM2_FORCE_GRANULARITY=CACHE_LINE fio_run wb-mode1 wb0 "$CACHE" "$BACK" "$DELAY" "$QOS" \
    "$(wb_entry wb0 Cache0 Delay0 1 "$POOLS/pool" "${WB_PARAMS:-}")"
echo "fio runs took $((SECONDS - run_start)) s"

python3 - "$WORK" "$HOOK_PAUSE" backing:pt0 ocf-wb:ocf0 wb-mode0:wb0 wb-mode1:wb0 <<'PY'
import glob, json, os, sys

work, pause = sys.argv[1], float(sys.argv[2])
targets = [t.split(":") for t in sys.argv[3:]]


def load(path):
    text = open(path).read()
    return json.loads(text[text.index("{"):] if "{" in text else text)


def value(samples, lo, hi, after, bdev):
    """Bytes written to bdev by the first sample asked for in [lo, hi] and
    answered at or after `after`."""
    for x in samples:
        if lo <= x["sent"] <= hi and x["t"] >= after:
            return x["written"].get(bdev)
    return None


def interpolated(samples, t, bdev):
    for a, b in zip(samples, samples[1:]):
        if a["t"] <= t <= b["t"] and bdev in a["written"] and bdev in b["written"]:
            wa, wb = a["written"][bdev], b["written"][bdev]
            return wa + (wb - wa) * (t - a["t"]) / (b["t"] - a["t"])
    return None


def job_written(d, samples, jobs, job, bdev):
    """Bytes written to bdev during job, and whether interpolated. The count
    at a job's start: a sample asked for after the previous job ended, and
    at the latest in the start hook's pause, that was answered after the
    start was noted (in the pause, or on the job's first poll if the job's
    blocked thread held it up). At its end: a sample asked for after the end
    was noted and before the next job's pause ran out (a job's thread holds
    it up until the end hook returns, then no I/O runs until the next job)."""
    t = lambda j, e: float(open(f"{d}/{j}.{e}").read())
    i = jobs.index(job)
    start, end = t(job, "start"), t(job, "end")
    prev_end = t(jobs[i - 1], "end") if i else 0.0
    next_start = t(jobs[i + 1], "start") + pause if i + 1 < len(jobs) else float("inf")
    w0 = value(samples, prev_end, start + pause, start, bdev)
    w1 = value(samples, end, next_start, end, bdev)
    approx = w0 is None or w1 is None
    if w0 is None:
        w0 = interpolated(samples, start, bdev)
    if w1 is None:
        w1 = interpolated(samples, end, bdev)
    if w0 is None or w1 is None:
        sys.exit(f"{d}: no bdev_get_iostat samples of {bdev} around job {job}")
    return w1 - w0, approx


R = {}
for name, top in targets:
    d = f"{work}/{name}"
    jobs = {j["jobname"]: j for j in load(f"{d}/fio.json")["jobs"]}
    order = ["burst", "sustained", "zipf"]
    samples = [json.loads(line) for line in open(f"{d}/iostat.jsonl")]
    r = R[name] = {}
    for job, j in jobs.items():
        if j["error"]:
            sys.exit(f"{name}: job {job} failed with error {j['error']}")
        x = r[job] = {}
        for dd in ("read", "write"):
            pct = j[dd]["clat_ns"].get("percentile", {})
            x[dd] = {
                "iops": j[dd]["iops"],
                "p99": pct.get("99.000000", 0) / 1e6,
                "p999": pct.get("99.900000", 0) / 1e6,
            }
        user, approx = job_written(d, samples, order, job, top)
        x["user_bytes"], x["fio_bytes"] = user, j["write"]["io_bytes"]
        x["wa"] = None
        if name != "backing":
            cache, approx_c = job_written(d, samples, order, job, "Cache0")
            x["wa"] = (cache / user if user else None, approx or approx_c)
    # One-second IOPS of the sustained job: fio's iops log averaged over
    # log_avg_msec (time ms, value, ...); a window cut short by the end of the
    # job (under half a second) is left out.
    secs, prev = [], 0
    for f in glob.glob(f"{d}/sustained_iops*.log"):
        for line in open(f):
            fields = [v.strip() for v in line.split(",")]
            if len(fields) >= 2:
                if int(fields[0]) - prev >= 500:
                    secs.append(int(fields[1]))
                prev = int(fields[0])
    r["sustained"]["min_s"] = min(secs) if secs else None
    r["stats"] = None
    if os.path.exists(f"{d}/wb-stats.json"):
        s = json.load(open(f"{d}/wb-stats.json"))
        if isinstance(s, list):
            s = next((e for e in s if e.get("name") == top), s[0] if s else {})
        r["stats"] = s


def f(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)


ms = lambda v: f(v, "{:.2f}")
wa = lambda v: "-" if v is None else ("~" if v[1] else "") + f(v[0], "{:.2f}")
names = [t[0] for t in targets]

print("\nburst: randwrite within half the cache")
print(f"{'target':<10} {'IOPS':>9} {'p99 ms':>9} {'p99.9 ms':>9} {'cache WA':>9}")
for n in names:
    x = R[n]["burst"]
    print(f"{n:<10} {f(x['write']['iops']):>9} {ms(x['write']['p99']):>9} {ms(x['write']['p999']):>9} {wa(x['wa']):>9}")

print("\nsustained: randwrite over the whole device")
print(f"{'target':<10} {'IOPS':>9} {'min 1s':>9} {'p99 ms':>9} {'p99.9 ms':>9} {'cache WA':>9}")
for n in names:
    x = R[n]["sustained"]
    print(f"{n:<10} {f(x['write']['iops']):>9} {f(x['min_s']):>9} {ms(x['write']['p99']):>9} "
          f"{ms(x['write']['p999']):>9} {wa(x['wa']):>9}")

print("\nzipf: randrw 70 % reads on the full cache")
print(f"{'target':<10} {'read IOPS':>9} {'write IOPS':>10} {'r p99':>8} {'r p99.9':>8} {'w p99':>8} {'w p99.9':>8} {'cache WA':>9}"
      "   (latencies in ms)")
for n in names:
    x = R[n]["zipf"]
    rd, wr = x["read"], x["write"]
    print(f"{n:<10} {f(rd['iops']):>9} {f(wr['iops']):>10} {ms(rd['p99']):>8} {ms(rd['p999']):>8} "
          f"{ms(wr['p99']):>8} {ms(wr['p999']):>8} {wa(x['wa']):>9}")

print("\nwriteboost stats at the end (bdev_writeboost_get_stats, saved as <target>/wb-stats.json)")
keys = ["relocated_blocks", "writeback_blocks", "throttled_ns"]
print(f"{'target':<10}" + "".join(f" {k:>17}" for k in keys))
for n in names:
    s = R[n]["stats"]
    if s is None:
        continue
    st = s.get("stats", {}) if isinstance(s, dict) else {}
    print(f"{n:<10}" + "".join(f" {str(st.get(k, '-')):>17}" for k in keys))


def ratio(a, b):
    return "-" if a is None or b is None or not b else f"{a / b:.2f}"


json.dump(R, open(f"{work}/summary.json", "w"), indent=2)
print("\nratios")
for n in ("wb-mode0", "wb-mode1"):
    b, s, z = R[n]["burst"], R[n]["sustained"], R[n]["zipf"]
    ob, bs, oz, bz = R["ocf-wb"]["burst"], R["backing"]["sustained"], R["ocf-wb"]["zipf"], R["backing"]["zipf"]
    print(f"{n}: burst IOPS {ratio(b['write']['iops'], ob['write']['iops'])} x OCF, "
          f"p99 {ratio(b['write']['p99'], ob['write']['p99'])} x OCF")
    print(f"{n}: sustained IOPS {ratio(s['write']['iops'], bs['write']['iops'])} x backing, "
          f"p99 {ratio(s['write']['p99'], bs['write']['p99'])} x backing, "
          f"p99.9 {ratio(s['write']['p999'], bs['write']['p999'])} x backing, "
          f"min-second/mean {ratio(s['min_s'], s['write']['iops'])} "
          f"(backing {ratio(bs['min_s'], bs['write']['iops'])}, OCF "
          f"{ratio(R['ocf-wb']['sustained']['min_s'], R['ocf-wb']['sustained']['write']['iops'])})")
    print(f"{n}: zipf reads {ratio(z['read']['iops'], bz['read']['iops'])} x backing, "
          f"{ratio(z['read']['iops'], oz['read']['iops'])} x OCF; "
          f"writes {ratio(z['write']['iops'], bz['write']['iops'])} x backing, "
          f"{ratio(z['write']['iops'], oz['write']['iops'])} x OCF")
PY
if [ "${KEEP_WORK:-0}" = 1 ]; then
    echo "work directory kept: $WORK"
fi
