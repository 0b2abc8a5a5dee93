//! `wb_ack_check`: an SPDK application that writes self-describing 4 KiB
//! blocks to a bdev and logs what was acknowledged, or reads a log back and
//! checks that every write the device promised to keep is there.
//!
//! It is how the tests check a writeboost bdev across a clean restart or a
//! `kill -9` of the target: the checker runs as its own process and reaches
//! the target over NVMe/TCP (a `bdev_nvme_attach_controller` entry in its
//! `--json` config), so the target can die under it.
//!
//! ```text
//! wb_ack_check write  BDEV LOG BLOCKS SECONDS FLUSH_EVERY SEED -- <SPDK app args>
//! wb_ack_check verify BDEV LOG all|flushed                     -- <SPDK app args>
//! wb_ack_check pairs  BDEV COUNT SEED                           -- <SPDK app args>
//! ```
//!
//! Each block holds its block number, a sequence number and a pattern
//! derived from both. The log has `W block seq` for each acknowledged write
//! and `F n` once a FLUSH completes that was issued after the first `n`
//! acknowledgements. `verify all` expects every acknowledged write (mode 1);
//! `verify flushed` only those covered by a completed FLUSH (mode 0). A block
//! may hold a newer write than the one expected (one in flight at the
//! crash), never an older one and never a torn or foreign one.
//!
//! `pairs` times what a durable write costs an application that cannot
//! batch: COUNT rounds of one 4 KiB write then one FLUSH at queue depth 1,
//! reporting the latency of each pair (mean, median, 99th percentile).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, c_char, c_void};
use std::io::{BufRead, BufWriter, Write};
use std::ptr;
use std::time::{Duration, Instant};

use spdk_sys as sys;

const BLOCK: usize = 4096;
const QUEUE_DEPTH: usize = 16;

enum Job {
    Write {
        blocks: u64,
        until: Instant,
        flush_every: u64,
        rng: u64,
        log: BufWriter<std::fs::File>,
    },
    Pairs {
        blocks: u64,
        left: u64,
        rng: u64,
        pair_start: Instant,
        /// Nanoseconds per write+FLUSH pair.
        lat: Vec<u64>,
    },
    Verify {
        /// (block, lowest acceptable seq), in order.
        expect: Vec<(u64, u64)>,
        next: usize,
        checked: u64,
        bad: u64,
    },
}

struct State {
    job: Job,
    desc: *mut sys::spdk_bdev_desc,
    ch: *mut sys::spdk_io_channel,
    bufs: Vec<*mut u8>,
    free: Vec<usize>,
    seq: u64,
    acked: u64,
    since_flush: u64,
    flushing: bool,
    inflight: usize,
    /// Blocks with a write in flight: two concurrent writes to one block may
    /// land in either order, so a block gets a new write only once its last
    /// one completed.
    writing: HashSet<u64>,
    done: bool,
}

thread_local! {
    // The app is single-threaded: every callback runs on the app thread.
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn pattern(block: u64, seq: u64, buf: &mut [u8]) {
    buf[0..8].copy_from_slice(&block.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq ^ 0x5bd1_e995;
    for chunk in buf[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn fail(msg: &str) -> ! {
    eprintln!("wb_ack_check: {msg}");
    std::process::exit(2)
}

/// Ends the process once the job is over: the log is flushed and the device
/// may be gone, so nothing waits for a clean SPDK shutdown.
fn finish(st: &mut State) -> ! {
    match &mut st.job {
        Job::Write { log, .. } => {
            let _ = log.flush();
            println!(
                "wb_ack_check: acknowledged={} (written until the deadline)",
                st.acked
            );
            std::process::exit(0)
        }
        Job::Pairs { lat, .. } => {
            lat.sort_unstable();
            let n = lat.len().max(1);
            let mean = lat.iter().sum::<u64>() as f64 / n as f64 / 1e3;
            let pct = |p: usize| {
                lat.get((lat.len() * p / 100).min(n - 1))
                    .copied()
                    .unwrap_or(0) as f64
                    / 1e3
            };
            println!(
                "wb_ack_check: pairs={} mean_us={mean:.1} p50_us={:.1} p99_us={:.1}",
                lat.len(),
                pct(50),
                pct(99)
            );
            std::process::exit(0)
        }
        Job::Verify { checked, bad, .. } => {
            println!("wb_ack_check: checked={checked} bad={bad}");
            std::process::exit(if *bad == 0 { 0 } else { 1 })
        }
    }
}

extern "C" fn io_done(bdev_io: *mut sys::spdk_bdev_io, success: bool, arg: *mut c_void) {
    // SAFETY: bdev_io is ours to free once.
    unsafe { sys::spdk_bdev_free_io(bdev_io) };
    let (slot, block, seq) = {
        // SAFETY: arg is the boxed tag given at submission, taken back once.
        let t = unsafe { Box::from_raw(arg.cast::<(usize, u64, u64)>()) };
        *t
    };
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let st = s.as_mut().expect("state");
        st.inflight -= 1;
        if slot == usize::MAX {
            // A flush.
            st.flushing = false;
            match &mut st.job {
                Job::Write { log, .. } if success => {
                    let _ = writeln!(log, "F {seq}");
                    let _ = log.flush();
                }
                // The target is gone: what it acknowledged is logged; stop.
                Job::Write { .. } => st.done = true,
                Job::Pairs {
                    left,
                    pair_start,
                    lat,
                    ..
                } => {
                    if !success {
                        fail("a FLUSH failed");
                    }
                    lat.push(pair_start.elapsed().as_nanos() as u64);
                    *left -= 1;
                }
                _ => {}
            }
        } else {
            st.free.push(slot);
            st.writing.remove(&block);
            if !success {
                if matches!(st.job, Job::Pairs { .. }) {
                    fail("a write failed");
                }
                if matches!(st.job, Job::Write { .. }) {
                    // The target is gone (or failing): stop writing.
                    st.done = true;
                }
                // The target went away (or failed this write): not acknowledged.
                if let Job::Verify { bad, .. } = &mut st.job {
                    eprintln!("wb_ack_check: read of block {block} failed");
                    *bad += 1;
                }
            } else {
                match &mut st.job {
                    Job::Write { log, .. } => {
                        let _ = writeln!(log, "W {block} {seq}");
                        st.acked += 1;
                        st.since_flush += 1;
                    }
                    Job::Pairs { .. } => {
                        st.acked += 1;
                        st.since_flush += 1;
                    }
                    Job::Verify { checked, bad, .. } => {
                        // SAFETY: the slot's buffer has BLOCK bytes and the read finished.
                        let data = unsafe { std::slice::from_raw_parts(st.bufs[slot], BLOCK) };
                        let got_block = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
                        let got_seq = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
                        let mut want = vec![0u8; BLOCK];
                        pattern(got_block, got_seq, &mut want);
                        *checked += 1;
                        if got_block != block || got_seq < seq || want != data {
                            *bad += 1;
                            if *bad <= 10 {
                                eprintln!(
                                    "wb_ack_check: block {block}: expected seq >= {seq}, found block {got_block} seq {got_seq}{}",
                                    if want != data { " with a torn or foreign pattern" } else { "" }
                                );
                            }
                        }
                    }
                }
            }
        }
        pump(st);
    });
}

fn submit(st: &mut State, slot: usize, block: u64, seq: u64, write: bool) -> bool {
    let tag = Box::into_raw(Box::new((slot, block, seq))).cast::<c_void>();
    // SAFETY: desc/ch are open on this thread; the buffer is DMA memory of
    // BLOCK bytes owned by the state until the completion.
    let rc = unsafe {
        if slot == usize::MAX {
            let size = sys::spdk_bdev_get_num_blocks(sys::spdk_bdev_desc_get_bdev(st.desc))
                * sys::spdk_bdev_get_block_size(sys::spdk_bdev_desc_get_bdev(st.desc)) as u64;
            sys::spdk_bdev_flush(st.desc, st.ch, 0, size, Some(io_done), tag)
        } else if write {
            sys::spdk_bdev_write(
                st.desc,
                st.ch,
                st.bufs[slot].cast(),
                block * BLOCK as u64,
                BLOCK as u64,
                Some(io_done),
                tag,
            )
        } else {
            sys::spdk_bdev_read(
                st.desc,
                st.ch,
                st.bufs[slot].cast(),
                block * BLOCK as u64,
                BLOCK as u64,
                Some(io_done),
                tag,
            )
        }
    };
    if rc != 0 {
        // SAFETY: the tag was not handed over.
        drop(unsafe { Box::from_raw(tag.cast::<(usize, u64, u64)>()) });
        return false;
    }
    st.inflight += 1;
    true
}

fn pump(st: &mut State) {
    enum Next {
        Stop,
        Flush(u64),
        Write(u64, u64),
        Read(u64, u64),
    }
    while let Some(slot) = st.free.pop() {
        let next = match &mut st.job {
            Job::Write {
                blocks,
                until,
                flush_every,
                rng,
                ..
            } => {
                if st.done || Instant::now() >= *until {
                    Next::Stop
                } else if *flush_every > 0 && st.since_flush >= *flush_every && !st.flushing {
                    Next::Flush(st.acked)
                } else {
                    let mut block = next_rand(rng) % *blocks;
                    while st.writing.contains(&block) {
                        block = next_rand(rng) % *blocks;
                    }
                    st.seq += 1;
                    Next::Write(block, st.seq)
                }
            }
            Job::Pairs {
                blocks,
                left,
                rng,
                pair_start,
                ..
            } => {
                if st.inflight > 0 {
                    // Queue depth 1: the next command waits for this one.
                    st.free.push(slot);
                    break;
                } else if *left == 0 {
                    Next::Stop
                } else if st.since_flush > 0 {
                    Next::Flush(st.acked)
                } else {
                    *pair_start = Instant::now();
                    st.seq += 1;
                    Next::Write(next_rand(rng) % *blocks, st.seq)
                }
            }
            Job::Verify { expect, next, .. } => match expect.get(*next) {
                None => Next::Stop,
                Some(&(b, s)) => {
                    *next += 1;
                    Next::Read(b, s)
                }
            },
        };
        let ok = match next {
            Next::Stop => {
                st.done = true;
                st.free.push(slot);
                break;
            }
            Next::Flush(covered) => {
                st.free.push(slot);
                st.since_flush = 0;
                st.flushing = true;
                if !submit(st, usize::MAX, 0, covered, false) {
                    st.flushing = false;
                    break;
                }
                continue;
            }
            Next::Write(block, seq) => {
                // SAFETY: the buffer is free (its slot was on the free list).
                let buf = unsafe { std::slice::from_raw_parts_mut(st.bufs[slot], BLOCK) };
                pattern(block, seq, buf);
                let ok = submit(st, slot, block, seq, true);
                if ok {
                    st.writing.insert(block);
                }
                ok
            }
            Next::Read(block, seq) => submit(st, slot, block, seq, false),
        };
        if !ok {
            st.free.push(slot);
            break;
        }
    }
    if st.done && st.inflight == 0 {
        finish(st);
    }
}

/// Writes past the deadline never complete if the target is dead: end anyway.
extern "C" fn watchdog(_arg: *mut c_void) -> i32 {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let st = s.as_mut().expect("state");
        let stop = match &mut st.job {
            Job::Write { until, log, .. } => {
                // What was acknowledged reaches the file at least every tick.
                let _ = log.flush();
                Instant::now() > *until + Duration::from_secs(3)
            }
            Job::Verify { .. } | Job::Pairs { .. } => false,
        };
        if stop {
            finish(st);
        }
        pump(st);
    });
    sys::spdk_thread_poller_rc_SPDK_POLLER_IDLE as i32
}

extern "C" fn bdev_event(_ty: u32, _bdev: *mut sys::spdk_bdev, _ctx: *mut c_void) {}

struct Args {
    write: bool,
    /// COUNT of the pairs job (0: not that job).
    pairs: u64,
    bdev: String,
    log: String,
    blocks: u64,
    seconds: u64,
    flush_every: u64,
    seed: u64,
    all: bool,
}

static mut ARGS: Option<Args> = None;

extern "C" fn start(_arg: *mut c_void) {
    // SAFETY: ARGS is written once in main before the app starts and only read here.
    let a = unsafe { (*ptr::addr_of!(ARGS)).as_ref().expect("args") };
    let name = CString::new(a.bdev.clone()).unwrap_or_default();
    let mut desc = ptr::null_mut();
    // SAFETY: name is valid; desc is an out-parameter.
    let rc = unsafe {
        sys::spdk_bdev_open_ext(
            name.as_ptr(),
            a.write,
            Some(bdev_event),
            ptr::null_mut(),
            &mut desc,
        )
    };
    if rc != 0 {
        fail(&format!("cannot open bdev {} (rc {rc})", a.bdev));
    }
    // SAFETY: desc is open on this thread.
    let ch = unsafe { sys::spdk_bdev_get_io_channel(desc) };
    let bufs: Vec<*mut u8> = (0..QUEUE_DEPTH)
        // SAFETY: plain allocation; checked below.
        .map(|_| unsafe { sys::spdk_dma_zmalloc(BLOCK, BLOCK, ptr::null_mut()) }.cast::<u8>())
        .collect();
    if ch.is_null() || bufs.iter().any(|b| b.is_null()) {
        fail("out of memory");
    }
    let job = if a.pairs > 0 {
        // SAFETY: desc is open.
        let bytes = unsafe {
            let bdev = sys::spdk_bdev_desc_get_bdev(desc);
            sys::spdk_bdev_get_num_blocks(bdev) * sys::spdk_bdev_get_block_size(bdev) as u64
        };
        Job::Pairs {
            blocks: (bytes / BLOCK as u64).max(1),
            left: a.pairs,
            rng: a.seed.max(1),
            pair_start: Instant::now(),
            lat: Vec::with_capacity(a.pairs as usize),
        }
    } else if a.write {
        let f = std::fs::File::create(&a.log).unwrap_or_else(|e| fail(&format!("{}: {e}", a.log)));
        Job::Write {
            blocks: a.blocks,
            until: Instant::now() + Duration::from_secs(a.seconds),
            flush_every: a.flush_every,
            rng: a.seed.max(1),
            log: BufWriter::new(f),
        }
    } else {
        Job::Verify {
            expect: expectations(&a.log, a.all),
            next: 0,
            checked: 0,
            bad: 0,
        }
    };
    let st = State {
        job,
        desc,
        ch,
        bufs,
        free: (0..QUEUE_DEPTH).collect(),
        seq: 0,
        acked: 0,
        since_flush: 0,
        flushing: false,
        inflight: 0,
        writing: HashSet::new(),
        done: false,
    };
    STATE.with(|s| *s.borrow_mut() = Some(st));
    // SAFETY: a 100 ms poller on this thread; it lives until the process exits.
    unsafe { sys::spdk_poller_register(Some(watchdog), ptr::null_mut(), 100_000) };
    STATE.with(|s| pump(s.borrow_mut().as_mut().expect("state")));
}

/// What each block must hold at least, from a write log.
fn expectations(path: &str, all: bool) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| fail(&format!("{path}: {e}")));
    let mut writes = Vec::new();
    let mut durable = 0usize;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.unwrap_or_default();
        let mut it = line.split_whitespace();
        match (it.next(), it.next(), it.next()) {
            (Some("W"), Some(b), Some(s)) => {
                writes.push((b.parse().unwrap_or(0u64), s.parse().unwrap_or(0u64)))
            }
            (Some("F"), Some(n), None) => durable = durable.max(n.parse().unwrap_or(0)),
            _ => {}
        }
    }
    let upto = if all {
        writes.len()
    } else {
        durable.min(writes.len())
    };
    let mut need: HashMap<u64, u64> = HashMap::new();
    for &(b, s) in &writes[..upto] {
        let e = need.entry(b).or_insert(0);
        *e = (*e).max(s);
    }
    let mut v: Vec<_> = need.into_iter().collect();
    v.sort_unstable();
    println!(
        "wb_ack_check: {} acknowledged writes logged, {} covered by a completed flush; checking {} blocks",
        writes.len(),
        durable,
        v.len()
    );
    v
}

fn usage() -> ! {
    fail(
        "usage: wb_ack_check write BDEV LOG BLOCKS SECONDS FLUSH_EVERY SEED -- <SPDK args>\n       \
         wb_ack_check verify BDEV LOG all|flushed -- <SPDK args>\n       \
         wb_ack_check pairs BDEV COUNT SEED -- <SPDK args>",
    )
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let split = argv
        .iter()
        .position(|a| a == "--")
        .unwrap_or_else(|| usage());
    let ours = &argv[1..split];
    let num = |s: &String| s.parse::<u64>().unwrap_or_else(|_| usage());
    let args = match ours.first().map(String::as_str) {
        Some("pairs") if ours.len() == 4 => Args {
            write: true,
            pairs: num(&ours[2]).max(1),
            bdev: ours[1].clone(),
            log: String::new(),
            blocks: 0,
            seconds: 0,
            flush_every: 0,
            seed: num(&ours[3]),
            all: false,
        },
        Some("write") if ours.len() == 7 => Args {
            write: true,
            pairs: 0,
            bdev: ours[1].clone(),
            log: ours[2].clone(),
            blocks: match num(&ours[3]) {
                // Room to pick a block with no write in flight.
                b if b >= 2 * QUEUE_DEPTH as u64 => b,
                _ => fail(&format!("BLOCKS must be at least {}", 2 * QUEUE_DEPTH)),
            },
            seconds: num(&ours[4]),
            flush_every: num(&ours[5]),
            seed: num(&ours[6]),
            all: false,
        },
        Some("verify") if ours.len() == 4 => Args {
            write: false,
            pairs: 0,
            bdev: ours[1].clone(),
            log: ours[2].clone(),
            blocks: 0,
            seconds: 0,
            flush_every: 0,
            seed: 0,
            all: match ours[3].as_str() {
                "all" => true,
                "flushed" => false,
                _ => usage(),
            },
        },
        _ => usage(),
    };
    // SAFETY: written once, before the app (and its only thread) starts.
    unsafe { *ptr::addr_of_mut!(ARGS) = Some(args) };
    let spdk_args: Vec<CString> = std::iter::once(argv[0].clone())
        .chain(argv[split + 1..].iter().cloned())
        .map(|a| CString::new(a).unwrap_or_default())
        .collect();
    let mut cargv: Vec<*mut c_char> = spdk_args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    cargv.push(ptr::null_mut());
    let mut opts = sys::spdk_app_opts::default();
    // SAFETY: as in writeboost_tgt: valid opts and a NUL-terminated argv
    // that outlives the app.
    unsafe {
        sys::spdk_app_opts_init(&mut opts, std::mem::size_of::<sys::spdk_app_opts>());
        opts.name = c"wb_ack_check".as_ptr();
        opts.rpc_addr = ptr::null();
        if sys::spdk_app_parse_args(
            cargv.len() as i32 - 1,
            cargv.as_mut_ptr(),
            &mut opts,
            ptr::null(),
            ptr::null_mut(),
            None,
            None,
        ) != sys::spdk_app_parse_args_rvals_SPDK_APP_PARSE_ARGS_SUCCESS
        {
            usage();
        }
        let rc = sys::spdk_app_start(&mut opts, Some(start), ptr::null_mut());
        sys::spdk_app_fini();
        std::process::exit(rc);
    }
}
