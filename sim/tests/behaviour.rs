//! Behaviour of the engine on simulated devices: bad input, device failures,
//! writeback, recovery cost, bypass, read caching and backpressure.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use writeboost_engine::config::BufferMode;
use writeboost_engine::format::{FORMAT_VERSION, Superblock};
use writeboost_engine::geometry::Geometry;
use writeboost_engine::{
    BackingIdentity, ConfigError, Engine, FormatError, HeapAlloc, IoError, OpenError, OpenParams,
    ReqId, Tunables,
};
use writeboost_sim::device::SimDevice;
use writeboost_sim::harness::{Harness, Latency};
use writeboost_sim::pmem::SimPmem;

const MIB: u64 = 1 << 20;
const BACKING: u64 = 64 * MIB;
const UUID: [u8; 16] = [5; 16];

fn params(cache: u64) -> OpenParams {
    let mut p = OpenParams::new(
        cache,
        BackingIdentity {
            uuid: [3; 16],
            size: BACKING,
        },
        UUID,
    );
    p.segment_size = 128 << 10;
    p
}

fn lat() -> Latency {
    Latency {
        cache_read: 10_000,
        cache_write: 20_000,
        cache_flush: 50_000,
        backing_read: 100_000,
        backing_write: 100_000,
        backing_flush: 200_000,
        pmem_persist_4k: 1_000,
        jitter: false,
    }
}

fn open(p: OpenParams, cache: SimDevice, backing: SimDevice) -> Harness {
    let mut h = Harness::new(p, cache, backing, lat(), 7);
    assert!(h.wait_open());
    h
}

fn fresh(p: OpenParams) -> Harness {
    let cache = SimDevice::new(p.cache_size);
    let mut h = open(p, cache, SimDevice::new(BACKING));
    assert_eq!(h.opened, Some(Ok(())));
    // Counters start at zero for the test body.
    h.driver.engine_mut().clear_stats();
    h
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31) ^ i as u8)
        .collect()
}

/// Clean shutdown, then a new engine over the resulting device images.
fn restart(h: Harness, p: OpenParams) -> Harness {
    let (c, b) = shut_down(h);
    open(p, SimDevice::from_image(c), SimDevice::from_image(b))
}

/// Bytes a recovery may read: region 0, `logs` whole logs, and the headers
/// it looks at past the chain's end for a claim that a bad log was durable.
fn replay_read_budget(h: &Harness, logs: u64) -> u64 {
    use writeboost_engine::format::{DURABLE_LOOKAHEAD, META_AREA_LEN};
    let geo = h.engine().geometry();
    META_AREA_LEN as u64
        + logs * geo.segment_size
        + DURABLE_LOOKAHEAD.min(geo.nr_segments) * geo.header_len() as u64
}

/// Power loss now: only what is durable survives (plus random volatile bits).
fn power_loss(h: Harness, p: OpenParams) -> Harness {
    let (c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(1));
    open(p, SimDevice::from_image(c), SimDevice::from_image(b))
}

fn crc32c(b: &[u8]) -> u32 {
    // Bitwise CRC-32C, independent of the crate the engine uses.
    let mut crc = !0u32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn cache_too_small_is_refused_and_nothing_is_written() {
    let p = params(256 << 10);
    let h = open(p, SimDevice::new(256 << 10), SimDevice::new(BACKING));
    assert!(matches!(
        h.opened,
        Some(Err(OpenError::Geometry(FormatError::CacheTooSmall { .. })))
    ));
    assert!(h.cache.image().iter().all(|&b| b == 0));
    assert_eq!(h.engine().stats().cache_write_cmds, 0);
}

#[test]
fn a_cache_of_another_backing_device_is_refused_untouched() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    let h = restart(h, p.clone());
    let image = h.cache.image().to_vec();
    let mut other = p.clone();
    other.backing.uuid = [4; 16];
    let h2 = open(
        other,
        SimDevice::from_image(image.clone()),
        SimDevice::new(BACKING),
    );
    let Some(Err(e @ OpenError::BackingMismatch { .. })) = &h2.opened else {
        panic!("{:?}", h2.opened)
    };
    assert!(
        e.to_string().contains("format=true"),
        "message says what to do: {e}"
    );
    assert_eq!(h2.cache.image(), &image[..]);
}

#[test]
fn newer_version_corruption_and_block_size_are_typed_errors_and_nothing_is_written() {
    let p = params(8 * MIB);
    let h = restart(fresh(p.clone()), p.clone());
    let good = h.cache.image().to_vec();
    let resign = |img: &mut Vec<u8>| {
        let crc = crc32c(&img[..124]);
        img[124..128].copy_from_slice(&crc.to_le_bytes());
    };
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    resign(&mut newer);
    let mut corrupt = good.clone();
    corrupt[30] ^= 0xff;
    let mut block = good.clone();
    block[12..16].copy_from_slice(&8192u32.to_le_bytes());
    resign(&mut block);
    for (img, want) in [
        (newer, "newer"),
        (corrupt, "checksum"),
        (block, "block size"),
    ] {
        let h = open(
            p.clone(),
            SimDevice::from_image(img.clone()),
            SimDevice::new(BACKING),
        );
        let Some(Err(e)) = &h.opened else {
            panic!("{want}: opened")
        };
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert_eq!(h.cache.image(), &img[..], "{want}: device untouched");
    }
    // The intact device opens and keeps its identity.
    let h = open(
        p.clone(),
        SimDevice::from_image(good),
        SimDevice::new(BACKING),
    );
    assert_eq!(h.opened, Some(Ok(())));
    let sb = Superblock::parse(&h.cache.image()[..4096], p.cache_size).unwrap();
    assert_eq!(sb.cache_uuid, UUID);
}

#[test]
fn bad_parameters_are_rejected_before_any_io() {
    let mut p = params(8 * MIB);
    p.cache_block_size = 1024;
    assert!(matches!(
        Engine::open(p, HeapAlloc, 0),
        Err(ConfigError::OutOfRange {
            name: "cache_block_size",
            ..
        })
    ));
    let mut t = Tunables::default();
    assert!(t.set("barrier_deadline_ms", 10_001).is_err());
    let mut h = fresh(params(8 * MIB));
    let before = *h.engine().tunables();
    let mut bad = before;
    bad.writeback_threshold = 50;
    bad.read_cache_threshold = 500;
    let err = h.driver.engine_mut().set_options(bad, 0).unwrap_err();
    assert!(
        err.to_string().contains("read_cache_threshold=500"),
        "{err}"
    );
    assert_eq!(*h.engine().tunables(), before, "all or nothing");
    let mut good = before;
    good.writeback_threshold = 50;
    h.driver.engine_mut().set_options(good, 0).unwrap();
    assert_eq!(h.engine().tunables().writeback_threshold, 50);
}

#[test]
fn misaligned_and_out_of_range_requests_are_refused() {
    let mut h = fresh(params(8 * MIB));
    let now = h.now;
    let e = h.driver.engine_mut();
    assert!(e.submit_read(ReqId(1), 100, 512, now).is_err());
    assert!(e.submit_read(ReqId(1), BACKING - 512, 1024, now).is_err());
    assert!(e.submit_write(ReqId(1), 0, &[0; 100], false, now).is_err());
    assert!(e.submit_read(ReqId(1), u64::MAX - 511, 512, now).is_err());
    assert!(e.submit_read(ReqId(1), 0, 0, now).is_err());
}

#[test]
fn partial_sectors_merge_with_cached_and_backing_data() {
    let mut p = params(8 * MIB);
    p.tunables.writeback_threshold = 0;
    let mut h = fresh(p);
    let full = pattern(9, 8192);
    h.write(1, 0, &full, false).unwrap();
    h.flush(2).unwrap();
    h.driver.engine_mut().drop_caches(h.now);
    h.settle(1_000_000_000);
    assert_eq!(h.engine().status().nr_dirty_blocks, 0);
    // Sector 3 of block 0 and sectors 0..2 of block 1 are rewritten.
    let a = pattern(40, 512);
    let b = pattern(41, 1024);
    h.write(3, 1536, &a, false).unwrap();
    h.write(4, 4096, &b, false).unwrap();
    let mut want = full.clone();
    want[1536..2048].copy_from_slice(&a);
    want[4096..5120].copy_from_slice(&b);
    assert_eq!(h.read(5, 0, 8192).unwrap(), want);
    assert_eq!(h.read(6, 1024, 4608).unwrap(), want[1024..5632]);
    // And once the buffer is on the cache device too.
    h.flush(7).unwrap();
    assert_eq!(h.read(8, 512, 7168).unwrap(), want[512..7680]);
}

#[test]
fn drop_caches_writes_everything_back_with_falling_dirty_count() {
    let mut p = params(8 * MIB);
    p.tunables.writeback_threshold = 0; // nothing in the background
    p.tunables.nr_max_batched_writeback = 1;
    let mut h = fresh(p.clone());
    for i in 0..200u64 {
        h.write(10 + i, i * 3 * 4096, &pattern(i as u8, 4096), false)
            .unwrap();
    }
    h.flush(1).unwrap();
    let start = h.engine().status().nr_dirty_blocks;
    assert_eq!(start, 200);
    assert_eq!(h.engine().stats().backing_write_cmds, 0);
    h.driver.engine_mut().drop_caches(h.now);
    h.drain();
    let mut last = start;
    let mut seen_between = false;
    while h.engine().status().drop_caches_active {
        assert!(h.step());
        let d = h.engine().status().nr_dirty_blocks;
        assert!(d <= last, "dirty count never rises");
        seen_between |= d > 0 && d < start;
        last = d;
    }
    assert_eq!(last, 0);
    assert!(seen_between, "progress is observable");
    for i in 0..200u64 {
        let off = (i * 3 * 4096) as usize;
        assert_eq!(
            &h.backing.image()[off..off + 4096],
            &pattern(i as u8, 4096)[..]
        );
    }
    // The clean state is recorded: a restart after power loss replays nothing.
    h.settle(1_000_000_000);
    let h2 = power_loss(h, p);
    assert_eq!(h2.opened, Some(Ok(())));
    // Region 0, plus the read-ahead (4 logs) that finds no log after the
    // recorded frontier, plus the headers past it.
    assert!(
        h2.engine().stats().cache_read_bytes <= replay_read_budget(&h2, 4),
        "{:?}",
        h2.engine().stats()
    );
}

#[test]
fn background_writeback_waits_for_its_delay_and_writes_a_rewritten_block_once() {
    let mut p = params(8 * MIB);
    p.tunables.writeback_threshold = 100;
    p.tunables.writeback_delay_ms = 50;
    let mut h = fresh(p);
    h.write(1, 0, &pattern(1, 4096), false).unwrap();
    h.flush(2).unwrap();
    h.settle(20_000_000);
    assert_eq!(
        h.engine().stats().backing_write_cmds,
        0,
        "a durable log is left alone during its delay"
    );
    assert_eq!(h.engine().status().nr_dirty_blocks, 1);
    // Rewritten within the delay: the first copy never reaches the backing device.
    h.write(3, 0, &pattern(2, 4096), false).unwrap();
    h.flush(4).unwrap();
    // Nothing else happens: the engine's own deadline starts the writeback.
    h.settle(200_000_000);
    assert_eq!(h.engine().status().nr_dirty_blocks, 0);
    assert_eq!(h.engine().stats().backing_write_cmds, 1);
    assert_eq!(&h.backing.image()[..4096], &pattern(2, 4096)[..]);
}

#[test]
fn recovery_reads_only_what_is_dirty() {
    let mut p = params(16 * MIB);
    p.tunables.writeback_threshold = 0;
    p.tunables.update_sb_record_interval = 0;
    let mut h = fresh(p.clone());
    // Fill many logs and write them all back, then dirty just a few blocks.
    for i in 0..600u64 {
        h.write(100 + i, i * 4096, &pattern(i as u8, 4096), false)
            .unwrap();
    }
    h.flush(1).unwrap();
    h.driver.engine_mut().drop_caches(h.now);
    h.settle(1_000_000_000);
    for i in 0..10u64 {
        h.write(1000 + i, i * 8192, &pattern(200 + i as u8, 4096), true)
            .unwrap();
    }
    let mut h2 = power_loss(h, p);
    assert_eq!(h2.opened, Some(Ok(())));
    // Ten logs hold the dirty blocks; four more are read ahead whole.
    let read = h2.engine().stats().cache_read_bytes;
    assert!(
        read <= replay_read_budget(&h2, 10 + 4),
        "replay read {read} bytes for 10 dirty logs"
    );
    for i in 0..10u64 {
        assert_eq!(
            h2.read(2000 + i, i * 8192, 4096).unwrap(),
            pattern(200 + i as u8, 4096)
        );
    }
    for i in (1..600u64).step_by(2) {
        assert_eq!(
            h2.read(3000 + i, i * 4096, 4096).unwrap(),
            pattern(i as u8, 4096),
            "block {i}"
        );
    }
}

#[test]
fn a_torn_last_log_is_ignored_and_earlier_data_survives() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    let second = h.engine().status().next_segment_id;
    h.write(2, 4096, &pattern(2, 4096), true).unwrap();
    let (mut c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(1));
    // Tear the second log: one byte of its data block differs.
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    let off = geo.slot_offset(writeboost_engine::LogId(second), 0) as usize;
    c[off + 100] ^= 0xff;
    let mut h2 = open(p, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h2.opened, Some(Ok(())));
    assert_eq!(h2.read(3, 0, 4096).unwrap(), pattern(1, 4096));
    // The torn log is not replayed: block 1 reads as before it (zeroes).
    assert_eq!(h2.read(4, 4096, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn failing_cache_writes_fail_durable_requests_and_go_read_only_without_losing_reads() {
    let mut h = fresh(params(8 * MIB));
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    h.fail_cache_writes = true;
    h.write(2, 8192, &pattern(2, 4096), false).unwrap(); // buffered: acknowledged
    assert_eq!(
        h.write(3, 16384, &pattern(3, 4096), true),
        Err(IoError::CacheDevice)
    );
    assert!(h.engine().is_read_only());
    assert_eq!(
        h.write(4, 0, &pattern(4, 4096), false),
        Err(IoError::ReadOnly)
    );
    assert_eq!(h.flush(5), Err(IoError::ReadOnly));
    assert!(
        h.engine().stats().io_retries >= 3,
        "retried before giving up"
    );
    // Everything acknowledged still reads back.
    assert_eq!(h.read(6, 0, 4096).unwrap(), pattern(1, 4096));
    assert_eq!(h.read(7, 8192, 4096).unwrap(), pattern(2, 4096));
    assert_eq!(h.read(8, 16384, 4096).unwrap(), pattern(3, 4096));
}

#[test]
fn large_writes_bypass_the_log_and_write_around_keeps_cached_lines_consistent() {
    let mut p = params(8 * MIB);
    p.tunables.bypass_write_kib = 256;
    let mut h = fresh(p);
    let big = pattern(7, 512 << 10);
    h.write(1, MIB, &big, true).unwrap();
    let s = h.engine().stats().clone();
    assert_eq!(s.cache_write_cmds, 0);
    assert_eq!(s.bypass_write_bytes, 512 << 10);
    assert_eq!(h.read(2, MIB, 512 << 10).unwrap(), big);
    // A dirty cached block inside a large write keeps that write in the log.
    h.write(3, 4 * MIB, &pattern(8, 4096), false).unwrap();
    let mixed = pattern(9, 256 << 10);
    h.write(4, 4 * MIB, &mixed, false).unwrap();
    assert_eq!(h.read(5, 4 * MIB, 256 << 10).unwrap(), mixed);
    let mut t = *h.engine().tunables();
    t.write_around_mode = true;
    let now = h.now;
    h.driver.engine_mut().set_options(t, now).unwrap();
    h.write(6, 20 * MIB, &pattern(10, 4096), false).unwrap();
    assert!(
        h.engine()
            .describe_block(20 * MIB / 4096)
            .contains("not cached")
    );
    assert_eq!(h.read(7, 20 * MIB, 4096).unwrap(), pattern(10, 4096));
}

#[test]
fn read_caching_stages_random_misses_but_not_long_sequential_runs() {
    let mut p = params(8 * MIB);
    p.tunables.read_cache_threshold = 4;
    let mut h = fresh(p);
    h.read(1, 40 * 4096, 4096).unwrap();
    h.read(2, 90 * 4096, 8192).unwrap();
    assert_eq!(h.engine().stats().read_cache_staged, 3);
    let backing_reads = h.engine().stats().backing_read_cmds;
    assert_eq!(h.read(3, 40 * 4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(
        h.engine().stats().backing_read_cmds,
        backing_reads,
        "second read is a hit"
    );
    // A long sequential stream is not cached past the threshold.
    for i in 0..16u64 {
        h.read(10 + i, (200 + i * 2) * 4096, 8192).unwrap();
    }
    assert!(h.engine().stats().read_cache_staged <= 3 + 4);
}

#[test]
fn a_full_cache_applies_backpressure_and_loses_nothing() {
    let mut p = params(MIB); // 7 segments of 128 KiB
    p.tunables.writeback_threshold = 0;
    p.tunables.bypass_write_kib = 0;
    let mut h = fresh(p.clone());
    // Ten times the cache size, with overwrites, at queue depth 1.
    for i in 0..1500u64 {
        let block = (i * 7) % 600;
        h.write(100 + i, block * 4096, &pattern(i as u8, 4096), false)
            .unwrap();
    }
    assert!(
        h.engine().stats().backing_write_cmds > 0,
        "writeback ran because the cache filled"
    );
    let mut h = restart(h, p);
    for block in 0..600u64 {
        let last = (0..1500u64).rev().find(|i| (i * 7) % 600 == block).unwrap();
        assert_eq!(
            h.read(5000 + block, block * 4096, 4096).unwrap(),
            pattern(last as u8, 4096),
            "block {block}"
        );
    }
}

#[test]
fn fua_in_volatile_mode_makes_partial_logs_and_counts_them() {
    let mut p = params(8 * MIB);
    p.tunables.barrier_deadline_ms = 0;
    let mut h = fresh(p);
    for i in 0..5u64 {
        h.write(i + 1, i * 4096, &pattern(i as u8, 4096), true)
            .unwrap();
    }
    let s = h.engine().stats();
    assert_eq!(s.nr_partial_flushed, 5);
    // One log write per FUA write.
    assert_eq!(s.cache_write_cmds, 5);
    // Five full-size write misses, not on buffer.
    assert_eq!(s.io[1][0][0][1], 5);
}

#[test]
fn losing_both_superblock_records_is_refused_without_writing() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    let (mut c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(3));
    c[4096..3 * 4096].fill(0xee);
    let h2 = open(
        p,
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b),
    );
    assert_eq!(h2.opened, Some(Err(OpenError::NoRecord)));
    assert_eq!(h2.cache.image(), &c[..]);
    assert!(OpenError::NoRecord.to_string().contains("format=true"));
}

fn pool_params(cache: u64) -> OpenParams {
    let mut p = params(cache);
    p.mode = BufferMode::Persistent;
    p
}

/// A pool with room for `slots` slots of 128 KiB segments.
fn pool(slots: u64) -> SimPmem {
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    let slot = writeboost_engine::pmem::PoolLayout::new(u64::MAX / 2, &geo)
        .unwrap()
        .slot_size;
    SimPmem::new(4096 + slots * slot)
}

fn open_pool(p: OpenParams, cache: SimDevice, backing: SimDevice, pm: Option<SimPmem>) -> Harness {
    let mut h = Harness::with_pool(p, cache, backing, pm, lat(), 7);
    assert!(h.wait_open());
    h
}

#[test]
fn mode_1_needs_a_pool_and_refuses_foreign_or_tiny_ones() {
    assert!(matches!(
        Engine::open(pool_params(8 * MIB), HeapAlloc, 0),
        Err(ConfigError::PoolRequired)
    ));
    let h = open_pool(
        pool_params(8 * MIB),
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        Some(SimPmem::new(64 << 10)),
    );
    assert!(
        matches!(
            h.opened,
            Some(Err(OpenError::Pool(FormatError::PoolTooSmall { .. })))
        ),
        "{:?}",
        h.opened
    );
    // A pool formatted for one cache is refused by another, untouched.
    let pm = pool(3);
    let mut h = open_pool(
        pool_params(8 * MIB),
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        Some(pm.clone()),
    );
    assert_eq!(h.opened, Some(Ok(())));
    h.write(1, 0, &pattern(1, 4096), false).unwrap();
    let image = pm.crash(&mut ChaCha8Rng::seed_from_u64(1));
    let mut other = pool_params(8 * MIB);
    other.new_cache_uuid = [6; 16];
    let h2 = open_pool(
        other,
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        Some(SimPmem::from_image(image.clone())),
    );
    assert_eq!(h2.opened, Some(Err(OpenError::PoolMismatch)));
    assert_eq!(
        h2.pmem.unwrap().crash(&mut ChaCha8Rng::seed_from_u64(1)),
        image
    );
}

#[test]
fn mode_1_acknowledges_fua_from_pmem_without_partial_logs() {
    let pm = pool(3);
    let mut h = open_pool(
        pool_params(8 * MIB),
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        Some(pm),
    );
    h.driver.engine_mut().clear_stats();
    for i in 0..40u64 {
        let t0 = h.now;
        h.write(10 + i, i * 4096, &pattern(i as u8, 4096), true)
            .unwrap();
        // Far below one cache-device write plus flush (70 µs here).
        assert!(h.now - t0 < 20_000, "FUA write took {} ns", h.now - t0);
    }
    h.flush(100).unwrap();
    let s = h.engine().stats().clone();
    assert_eq!(s.nr_partial_flushed, 0);
    assert_eq!(
        s.cache_write_cmds, 1,
        "one full log of 31 blocks, the rest still in pmem"
    );
    // Power loss: everything acknowledged comes back from the pool.
    let pimg = h
        .pmem
        .as_ref()
        .unwrap()
        .crash(&mut ChaCha8Rng::seed_from_u64(2));
    let (c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(2));
    let mut h2 = open_pool(
        pool_params(8 * MIB),
        SimDevice::from_image(c),
        SimDevice::from_image(b),
        Some(SimPmem::from_image(pimg)),
    );
    assert_eq!(h2.opened, Some(Ok(())));
    for i in 0..40u64 {
        assert_eq!(
            h2.read(200 + i, i * 4096, 4096).unwrap(),
            pattern(i as u8, 4096),
            "block {i}"
        );
    }
}

#[test]
fn leaving_mode_1_needs_the_pool_and_drains_it() {
    let pm = pool(3);
    let mut h = open_pool(
        pool_params(8 * MIB),
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        Some(pm),
    );
    for i in 0..5u64 {
        h.write(10 + i, i * 4096, &pattern(i as u8, 4096), false)
            .unwrap();
    }
    // Clean shutdown in mode 1 leaves the partial buffer in pmem.
    h.driver.engine_mut().shutdown(h.now);
    h.drain();
    while !h.shut_down {
        assert!(h.step());
    }
    assert_eq!(h.engine().stats().nr_partial_flushed, 0);
    let pimg = h
        .pmem
        .as_ref()
        .unwrap()
        .crash(&mut ChaCha8Rng::seed_from_u64(3));
    let (c, b) = (h.cache.image().to_vec(), h.backing.image().to_vec());
    // Mode 0 without the pool would lose those writes: refused, untouched.
    let h0 = open_pool(
        params(8 * MIB),
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b.clone()),
        None,
    );
    assert_eq!(h0.opened, Some(Err(OpenError::PoolRequired)));
    assert_eq!(h0.cache.image(), &c[..]);
    // Mode 0 with the pool drains it to the cache device.
    let mut h1 = open_pool(
        params(8 * MIB),
        SimDevice::from_image(c),
        SimDevice::from_image(b),
        Some(SimPmem::from_image(pimg)),
    );
    assert_eq!(h1.opened, Some(Ok(())));
    assert!(!h1.engine().is_persistent());
    for i in 0..5u64 {
        assert_eq!(
            h1.read(100 + i, i * 4096, 4096).unwrap(),
            pattern(i as u8, 4096)
        );
    }
    h1.settle(1_000_000_000);
    let h2 = restart(h1, params(8 * MIB));
    assert_eq!(
        h2.opened,
        Some(Ok(())),
        "drained: the pool is no longer needed"
    );
}

// ----- recovery decision table (docs/RECOVERY.md): rows without a test above

#[test]
fn one_damaged_record_slot_falls_back_to_the_other() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    // A restart writes the second record slot too.
    let h = restart(h, p.clone());
    let (c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(3));
    for slot in [4096usize, 2 * 4096] {
        let mut c = c.clone();
        c[slot..slot + 4096].fill(0xee);
        let mut h2 = open(
            p.clone(),
            SimDevice::from_image(c),
            SimDevice::from_image(b.clone()),
        );
        assert_eq!(h2.opened, Some(Ok(())), "record slot at {slot} damaged");
        assert_eq!(h2.read(2, 0, 4096).unwrap(), pattern(1, 4096));
    }
}

#[test]
fn a_log_claiming_a_later_epoch_than_the_record_ends_the_chain() {
    use writeboost_engine::format::{encode_segment_header, verify_segment};
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    let second = writeboost_engine::LogId(h.engine().status().next_segment_id);
    let epoch = h.engine().status().epoch;
    h.write(2, 4096, &pattern(2, 4096), true).unwrap();
    let (mut c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(1));
    // Re-seal the second log, checksum and all, as if written by an
    // incarnation the record never announced.
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    let at = geo.segment_offset(second) as usize;
    let seg = &mut c[at..at + geo.segment_size as usize];
    let (hdr, mbs) = verify_segment(seg, &geo, &UUID).expect("the second log is intact");
    assert_eq!(hdr.epoch, epoch);
    let hl = geo.header_len();
    let (head, _) = seg.split_at_mut(hl);
    encode_segment_header(head, &geo, hdr.id, epoch + 5, hdr.durable_id, &UUID, &mbs);
    assert!(
        verify_segment(seg, &geo, &UUID).is_ok(),
        "a valid log but for its epoch"
    );
    let mut h2 = open(p, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h2.opened, Some(Ok(())));
    assert_eq!(h2.read(3, 0, 4096).unwrap(), pattern(1, 4096));
    assert_eq!(h2.read(4, 4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(h2.engine().status().next_segment_id, second.get());
}

#[test]
fn a_stale_log_from_the_previous_lap_ends_the_chain() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    let nr = h.engine().status().nr_segments;
    // Enough FUA writes (one partial log each) to go round the ring twice.
    let writes = 2 * nr + 10;
    for i in 0..writes {
        h.write(10 + i, (i % 16) * 4096, &pattern(i as u8, 4096), true)
            .unwrap();
    }
    let before = h.engine().status().next_segment_id;
    assert!(
        before > 2 * nr,
        "the ring wrapped ({before} logs, {nr} positions)"
    );
    let mut h2 = restart(h, p);
    assert_eq!(h2.opened, Some(Ok(())));
    // Recovery stopped at the position after the last log, which holds a
    // log one lap older, and goes on from there.
    assert_eq!(h2.engine().status().next_segment_id, before);
    for b in 0..16u64 {
        let last = (0..writes).rev().find(|i| i % 16 == b).unwrap();
        assert_eq!(
            h2.read(1000 + b, b * 4096, 4096).unwrap(),
            pattern(last as u8, 4096),
            "block {b}"
        );
    }
}

#[test]
fn an_empty_pool_where_the_record_expects_one_is_refused_untouched() {
    let mut h = open_pool(
        pool_params(8 * MIB),
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        Some(pool(3)),
    );
    h.write(1, 0, &pattern(1, 4096), false).unwrap();
    let (c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(4));
    // The pool that held the acknowledged write is gone; a blank one is offered.
    let h2 = open_pool(
        pool_params(8 * MIB),
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b),
        Some(pool(3)),
    );
    assert_eq!(h2.opened, Some(Err(OpenError::PoolMismatch)));
    assert_eq!(h2.cache.image(), &c[..]);
}

#[test]
fn a_cache_device_that_cannot_be_read_at_start_up_is_refused_untouched() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    let (c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(5));
    let mut h2 = Harness::new(
        p,
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b),
        lat(),
        7,
    );
    // Every command fails, retries included.
    h2.error_rate = 1.0;
    assert!(h2.wait_open());
    assert!(
        matches!(h2.opened, Some(Err(OpenError::Device { .. }))),
        "{:?}",
        h2.opened
    );
    assert_eq!(h2.cache.image(), &c[..]);
}

/// Three FUA writes, one log each; the images after a power loss and the
/// id of the middle log.
fn three_durable_logs(p: &OpenParams) -> (Vec<u8>, Vec<u8>, writeboost_engine::LogId) {
    let mut h = fresh(p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    let middle = writeboost_engine::LogId(h.engine().status().next_segment_id);
    h.write(2, 4096, &pattern(2, 4096), true).unwrap();
    h.write(3, 8192, &pattern(3, 4096), true).unwrap();
    let (c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(1));
    (c, b, middle)
}

#[test]
fn damaged_data_in_a_claimed_log_is_found_by_the_scrub_and_never_read_back() {
    let p = params(8 * MIB);
    let (mut c, b, middle) = three_durable_logs(&p);
    // Bit rot in the middle log's data block. The third log's header claims
    // the middle one durable, so recovery replays it from its header alone.
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    c[geo.segment_offset(middle) as usize + geo.header_len() + 100] ^= 4;
    let mut h = open(
        p.clone(),
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b.clone()),
    );
    assert_eq!(h.opened, Some(Ok(())));
    // The read waits for the scrub, which finds the damage: it fails.
    assert_eq!(h.read(4, 4096, 4096), Err(IoError::Corrupt));
    assert_eq!(h.read(5, 0, 4096).unwrap(), pattern(1, 4096));
    assert_eq!(h.read(6, 8192, 4096).unwrap(), pattern(3, 4096));
    let st = h.engine().status();
    assert_eq!((st.corrupt_blocks, st.unchecked_logs), (1, 0));
    assert_eq!(h.engine().quarantined_blocks(), vec![1]);
    // The block is quarantined: writeback passes its log, writing the
    // rest back, and the superblock record lists it, so a restart still
    // finds it once the damaged copy is no longer replayed.
    let mut t = *h.engine().tunables();
    t.writeback_delay_ms = 0;
    t.update_sb_record_interval = 1;
    let now = h.now;
    h.driver.engine_mut().set_options(t, now).unwrap();
    h.settle(3_000_000_000);
    let st = h.engine().status();
    assert!(st.recorded_writeback_id > middle.get(), "{st:?}");
    assert_eq!(st.nr_dirty_blocks, 1, "only the quarantined block is dirty");
    // Writing part of it would merge damaged sectors: refused.
    assert_eq!(
        h.write(12, 4096 + 512, &pattern(12, 512), false),
        Err(IoError::Corrupt)
    );
    let mut h = power_loss(h, p.clone());
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.read(7, 4096, 4096), Err(IoError::Corrupt));
    assert_eq!(h.engine().quarantined_blocks(), vec![1]);
    assert_eq!(h.read(13, 0, 4096).unwrap(), pattern(1, 4096));
    // A whole new copy replaces the damaged one, and survives a crash.
    h.write(8, 4096, &pattern(8, 4096), true).unwrap();
    assert_eq!(h.read(9, 4096, 4096).unwrap(), pattern(8, 4096));
    assert_eq!(h.engine().status().corrupt_blocks, 0);
    let mut h = power_loss(h, p.clone());
    assert_eq!(h.read(14, 4096, 4096).unwrap(), pattern(8, 4096));
    assert!(h.engine().quarantined_blocks().is_empty());
    // A salvage, which reads every log whole, keeps the damaged log too:
    // only the damaged block is held back (quarantined), and giving it up
    // falls back to the older contents (here the backing device's zeroes).
    let mut s = p.clone();
    s.salvage = true;
    let mut h = open(s, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.engine().stats().salvaged_logs_skipped, 0);
    assert_eq!(h.read(10, 4096, 4096), Err(IoError::Corrupt));
    assert_eq!(h.read(11, 8192, 4096).unwrap(), pattern(3, 4096));
    let now = h.now;
    assert!(h.driver.engine_mut().drop_quarantine(1, now));
    assert!(!h.driver.engine_mut().drop_quarantine(1, now));
    assert_eq!(h.read(12, 4096, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn a_damaged_log_below_a_later_claim_is_corruption_and_salvage_keeps_the_rest() {
    let p = params(8 * MIB);
    let (mut c, b, middle) = three_durable_logs(&p);
    // Bit rot in the middle log's header: the third log's header says the
    // middle one was durable, so this is no torn tail.
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    c[geo.segment_offset(middle) as usize + 100] ^= 4;
    let untouched = c.clone();
    let h = open(
        p.clone(),
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b.clone()),
    );
    match &h.opened {
        Some(Err(OpenError::Corrupt { first_bad, claimed })) => {
            assert_eq!(*first_bad, middle.get());
            assert!(*claimed >= middle.get());
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    assert_eq!(h.cache.image(), &untouched[..], "nothing written");
    // A salvage keeps the logs around the damaged one; its block reads as
    // its older contents (the backing device's zeroes).
    let mut s = p.clone();
    s.salvage = true;
    let mut h = open(s, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.engine().stats().salvaged_logs_skipped, 1);
    assert_eq!(h.read(4, 0, 4096).unwrap(), pattern(1, 4096));
    assert_eq!(h.read(5, 4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(h.read(6, 8192, 4096).unwrap(), pattern(3, 4096));
    // The skipped position became an empty log: the next start, without
    // salvage, finds the chain whole.
    let mut h = power_loss(h, p);
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.read(7, 8192, 4096).unwrap(), pattern(3, 4096));
}

#[test]
fn a_lost_or_misdirected_durable_log_is_corruption() {
    let p = params(8 * MIB);
    let (c, b, middle) = three_durable_logs(&p);
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    let (at, seg) = (
        geo.segment_offset(middle) as usize,
        geo.segment_size as usize,
    );
    // Lost: the position still holds zeroes. Misdirected: it holds the
    // next position's log.
    let mut lost = c.clone();
    lost[at..at + seg].fill(0);
    let mut misdirected = c.clone();
    misdirected.copy_within(at + seg..at + 2 * seg, at);
    for img in [lost, misdirected] {
        let h = open(
            p.clone(),
            SimDevice::from_image(img),
            SimDevice::from_image(b.clone()),
        );
        assert!(
            matches!(h.opened, Some(Err(OpenError::Corrupt { first_bad, .. })) if first_bad == middle.get()),
            "{:?}",
            h.opened
        );
    }
}

#[test]
fn a_torn_newest_log_claimed_by_nothing_is_a_torn_tail() {
    let p = params(8 * MIB);
    let (mut c, b, middle) = three_durable_logs(&p);
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    // The newest log: no record or later header can claim it.
    let newest = middle.next();
    c[geo.segment_offset(newest) as usize + geo.header_len() + 7] ^= 1;
    let mut h = open(p, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.read(4, 4096, 4096).unwrap(), pattern(2, 4096));
    assert_eq!(h.engine().status().next_segment_id, newest.get());
}

/// Forty blocks spread over several logs, some written twice.
fn several_logs(h: &mut Harness) {
    for i in 0..40u64 {
        h.write(10 + i, i * 3 * 4096, &pattern(i as u8, 4096), i % 7 == 0)
            .unwrap();
    }
    for i in 0..10u64 {
        h.write(60 + i, i * 3 * 4096, &pattern(100 + i as u8, 4096), false)
            .unwrap();
    }
}

fn expect_several_logs(h: &mut Harness) {
    for i in 0..40u64 {
        let want = if i < 10 { 100 + i as u8 } else { i as u8 };
        assert_eq!(
            h.read(200 + i, i * 3 * 4096, 4096).unwrap(),
            pattern(want, 4096),
            "block {}",
            i * 3
        );
    }
}

#[test]
fn a_clean_shutdown_resumes_from_its_checkpoint_without_reading_logs() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    several_logs(&mut h);
    let mut h = restart(h, p.clone());
    assert_eq!(h.opened, Some(Ok(())));
    let st = h.engine().stats().clone();
    assert_eq!((st.checkpoints_loaded, st.checkpoints_rejected), (1, 0));
    // Start-up read region 0 and the checkpoint, not one log header; the
    // scrub, once the cache is ready, checks the logs' data (at most its
    // window of four logs is read by now), and reads wait for it.
    let geo = *h.engine().geometry();
    use writeboost_engine::format::META_AREA_LEN;
    let startup = META_AREA_LEN as u64 + geo.checkpoint_layout().len;
    assert!(st.cache_read_bytes >= startup);
    assert!(st.cache_read_bytes <= startup + 4 * geo.segment_size);
    assert!(h.engine().status().unchecked_logs > 0);
    expect_several_logs(&mut h);
    assert_eq!(h.engine().status().corrupt_blocks, 0);
    // The new incarnation's first record no longer names the checkpoint:
    // after a crash the logs are replayed, the checkpoint ignored.
    let mut h = power_loss(h, p.clone());
    assert_eq!(h.opened, Some(Ok(())));
    let st = h.engine().stats().clone();
    assert_eq!((st.checkpoints_loaded, st.checkpoints_rejected), (0, 0));
    expect_several_logs(&mut h);
    // A second clean shutdown writes a new one.
    let mut h = restart(h, p);
    assert_eq!(h.engine().stats().checkpoints_loaded, 1);
    expect_several_logs(&mut h);
}

#[test]
fn a_log_damaged_under_a_checkpoint_is_found_by_the_scrub() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    several_logs(&mut h);
    // The log holding block 30's only copy.
    let where_ = h.engine().describe_block(30);
    let id: u64 = where_.split(' ').nth(1).unwrap().parse().unwrap();
    h.driver.engine_mut().shutdown(h.now);
    h.drain();
    while !h.shut_down {
        assert!(h.step(), "shutdown stuck");
    }
    let geo = *h.engine().geometry();
    let (mut c, b) = (h.cache.image().to_vec(), h.backing.image().to_vec());
    // That log's write was lost while the cache was down.
    let at = geo.segment_offset(writeboost_engine::LogId(id)) as usize;
    c[at..at + geo.segment_size as usize].fill(0);
    let mut h = open(
        p.clone(),
        SimDevice::from_image(c),
        SimDevice::from_image(b),
    );
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.engine().stats().checkpoints_loaded, 1);
    // Block 0 lives in another log; block 30's copy is gone: its read fails.
    assert_eq!(h.read(1, 0, 4096).unwrap(), pattern(100, 4096));
    assert_eq!(
        h.read(2, 30 * 4096, 4096).map(|_| ()),
        Err(IoError::Corrupt)
    );
    assert!(h.engine().status().corrupt_blocks > 0);
}

#[test]
fn a_damaged_checkpoint_is_refused_and_the_logs_replayed() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    several_logs(&mut h);
    h.driver.engine_mut().shutdown(h.now);
    h.drain();
    while !h.shut_down {
        assert!(h.step(), "shutdown stuck");
    }
    let geo = *h.engine().geometry();
    let (c, b) = (h.cache.image().to_vec(), h.backing.image().to_vec());
    let at = geo.checkpoint_offset() as usize;
    let layout = geo.checkpoint_layout();
    // A bit in the header, in a ring position, in the index words, in the table.
    for off in [20, layout.positions + 3, layout.words + 1, layout.table + 2] {
        let mut img = c.clone();
        img[at + off as usize] ^= 0x10;
        let mut h = open(
            p.clone(),
            SimDevice::from_image(img),
            SimDevice::from_image(b.clone()),
        );
        assert_eq!(h.opened, Some(Ok(())), "damage at {off}");
        let st = h.engine().stats().clone();
        assert_eq!((st.checkpoints_loaded, st.checkpoints_rejected), (0, 1));
        expect_several_logs(&mut h);
    }
}

// ----- faults at the edges ---------------------------------------------------

/// Clean shutdown; the images it leaves.
fn shut_down(mut h: Harness) -> (Vec<u8>, Vec<u8>) {
    h.driver.engine_mut().shutdown(h.now);
    h.drain();
    while !h.shut_down {
        assert!(h.step(), "shutdown stuck");
    }
    (h.cache.image().to_vec(), h.backing.image().to_vec())
}

/// An engine over these images whose cache device is slow to return reads
/// (the scrub then runs alongside what follows the open).
fn open_with_slow_reads(p: OpenParams, (c, b): (Vec<u8>, Vec<u8>)) -> Harness {
    let slow = Latency {
        cache_read: 50_000_000,
        ..lat()
    };
    let mut h = Harness::new(
        p,
        SimDevice::from_image(c),
        SimDevice::from_image(b),
        slow,
        7,
    );
    assert!(h.wait_open());
    h
}

#[test]
fn logs_a_checkpoint_names_are_not_checked_once_new_logs_take_their_places() {
    // A small ring (13 positions) whose logs are all written back, then a
    // clean shutdown: the checkpoint names every log.
    let p = params(2 * MIB);
    let mut h = fresh(p.clone());
    for i in 0..200u64 {
        h.write(10 + i, (i % 50) * 4096, &pattern(i as u8, 4096), false)
            .unwrap();
    }
    let now = h.now;
    h.driver.engine_mut().drop_caches(now);
    h.settle(5_000_000_000);
    assert_eq!(h.engine().status().nr_dirty_blocks, 0);
    let mut h = open_with_slow_reads(p, shut_down(h));
    assert_eq!(h.engine().stats().checkpoints_loaded, 1);
    // A write burst right away wraps the ring while cache reads are slow:
    // new logs take over the positions of logs the checkpoint named. None
    // of it may be checked against the old headers, or hold a position.
    for i in 0..400u64 {
        h.write(
            1000 + i,
            (100 + i) * 4096,
            &pattern(i as u8 ^ 0x55, 4096),
            false,
        )
        .unwrap();
    }
    for i in (0..400u64).step_by(37) {
        assert_eq!(
            h.read(2000 + i, (100 + i) * 4096, 4096).unwrap(),
            pattern(i as u8 ^ 0x55, 4096)
        );
    }
    for i in 150..200u64 {
        assert_eq!(
            h.read(3000 + i, (i % 50) * 4096, 4096).unwrap(),
            pattern(i as u8, 4096)
        );
    }
    h.settle(10_000_000_000);
    let st = h.engine().stats();
    assert_eq!(
        (st.corrupt_blocks_found, h.engine().status().corrupt_blocks),
        (0, 0)
    );
}

#[test]
fn a_read_only_cache_still_checks_and_serves_what_it_replayed_unchecked() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    several_logs(&mut h);
    let mut h = open_with_slow_reads(p, shut_down(h));
    assert!(h.engine().status().unchecked_logs > 0);
    // The cache device fails writes before the scrub is through.
    h.fail_cache_writes = true;
    assert_eq!(
        h.write(100, 200 * 4096, &pattern(9, 4096), true),
        Err(IoError::CacheDevice)
    );
    assert!(h.engine().is_read_only());
    assert!(h.engine().status().unchecked_logs > 0);
    // Reads that need unchecked logs are served, checked, all the same.
    expect_several_logs(&mut h);
    // And the shutdown completes.
    let _ = shut_down(h);
}

#[test]
fn a_scrub_read_that_fails_is_a_device_error_not_damage() {
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    several_logs(&mut h);
    let (c, b) = shut_down(h);
    let mut h = open(p, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h.engine().stats().checkpoints_loaded, 1);
    // Every read of the cache device fails for a while, retries included.
    h.fail_cache_reads_in = Some(0..u64::MAX);
    assert_eq!(h.read(1, 0, 4096), Err(IoError::CacheDevice));
    let st = h.engine().status();
    assert_eq!(
        st.corrupt_blocks, 0,
        "a transient error marked data damaged"
    );
    assert!(h.engine().stats().scrub_read_errors > 0);
    // Writes are still taken, and once the device reads again so is everything.
    h.write(2, 300 * 4096, &pattern(7, 4096), false).unwrap();
    h.fail_cache_reads_in = None;
    h.settle(2_000_000_000);
    expect_several_logs(&mut h);
    assert_eq!(h.engine().stats().corrupt_blocks_found, 0);
    assert_eq!(h.read(3, 300 * 4096, 4096).unwrap(), pattern(7, 4096));
}

#[test]
fn an_unreadable_log_past_the_chain_is_ignored_and_one_in_it_needs_salvage() {
    let p = params(8 * MIB);
    let (c, b, middle) = three_durable_logs(&p);
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    let span = |id: u64| {
        let at = geo.segment_offset(writeboost_engine::LogId(id));
        at..at + geo.segment_size
    };
    // Past the chain's end (which the empty position after the newest log
    // ends): it cannot hold acknowledged data. (The position right after
    // the newest log could, so that one counts as in the chain.)
    let newest = middle.get() + 1;
    let mut h = Harness::new(
        p.clone(),
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b.clone()),
        lat(),
        7,
    );
    h.fail_cache_reads_in = Some(span(newest + 2));
    assert!(h.wait_open());
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.read(1, 8192, 4096).unwrap(), pattern(3, 4096));
    // In the chain: the open fails, saying what to do, and writes nothing.
    let mut h = Harness::new(
        p.clone(),
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b.clone()),
        lat(),
        7,
    );
    h.fail_cache_reads_in = Some(span(middle.get()));
    assert!(h.wait_open());
    let Some(Err(e @ OpenError::Unreadable { .. })) = &h.opened else {
        panic!("{:?}", h.opened);
    };
    assert!(e.to_string().contains("salvage=true"));
    assert_eq!(h.cache.image(), &c[..]);
    // A salvage skips it: its block reads as the backing device's.
    let mut s = p.clone();
    s.salvage = true;
    let mut h = Harness::new(
        s,
        SimDevice::from_image(c),
        SimDevice::from_image(b),
        lat(),
        7,
    );
    h.fail_cache_reads_in = Some(span(middle.get()));
    assert!(h.wait_open());
    assert_eq!(h.opened, Some(Ok(())));
    h.fail_cache_reads_in = None;
    assert_eq!(h.read(2, 4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(h.read(3, 8192, 4096).unwrap(), pattern(3, 4096));
}

#[test]
fn a_checkpoint_that_lies_with_matching_checksums_is_refused() {
    use writeboost_sim::corrupt::{Lie, lie_in_checkpoint};
    let p = params(8 * MIB);
    let mut h = fresh(p.clone());
    several_logs(&mut h);
    let (c, b) = shut_down(h);
    for lie in Lie::ALL {
        let mut img = c.clone();
        let told = lie_in_checkpoint(
            &mut img,
            p.cache_size,
            lie,
            &mut ChaCha8Rng::seed_from_u64(3),
        );
        assert_eq!(told, Some(lie));
        let mut h = open(
            p.clone(),
            SimDevice::from_image(img),
            SimDevice::from_image(b.clone()),
        );
        assert_eq!(h.opened, Some(Ok(())), "{lie:?}");
        let st = h.engine().stats().clone();
        assert_eq!(
            (st.checkpoints_loaded, st.checkpoints_rejected),
            (0, 1),
            "{lie:?}"
        );
        expect_several_logs(&mut h);
    }
}

#[test]
fn read_cached_copies_do_not_outlive_a_restart() {
    let mut p = params(8 * MIB);
    p.tunables.read_cache_threshold = 32;
    let mut h = fresh(p.clone());
    // Staged into the cache by a missed read.
    assert_eq!(h.read(1, 40 * 4096, 4096).unwrap(), vec![0; 4096]);
    h.settle(1_000_000_000);
    assert_eq!(h.engine().stats().read_cache_staged, 1);
    let (c, mut b) = shut_down(h);
    // The backing device changed while the cache was detached.
    b[40 * 4096..41 * 4096].copy_from_slice(&pattern(4, 4096));
    let mut h = open(p, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h.engine().stats().checkpoints_loaded, 1);
    assert_eq!(h.read(2, 40 * 4096, 4096).unwrap(), pattern(4, 4096));
}

#[test]
fn a_failed_backing_flush_fails_every_later_flush() {
    let mut p = params(8 * MIB);
    p.tunables.write_around_mode = true;
    let mut h = fresh(p);
    h.write(1, 0, &pattern(1, 4096), false).unwrap();
    h.fail_next_flush = Some(writeboost_engine::Device::Backing);
    assert_eq!(h.flush(2), Err(IoError::BackingDevice));
    // The device may have dropped the write: a flush that now succeeds
    // proves nothing about it, so none reports success.
    h.write(3, 4096, &pattern(3, 4096), false).unwrap();
    assert_eq!(h.flush(4), Err(IoError::BackingWritesLost));
    assert!(IoError::BackingWritesLost.to_string().contains("rewrite"));
    let st = h.engine().status();
    assert!(st.backing_writes_lost);
    assert_eq!(h.engine().stats().backing_flush_failures, 1);
}

#[test]
fn an_older_incarnations_log_of_the_same_id_under_a_checkpoint_is_damage() {
    use writeboost_engine::format::{Metablock, encode_segment_header, verify_segment_header};
    let p = params(8 * MIB);
    // A second incarnation: its logs have epoch 2.
    let h = fresh(p.clone());
    let mut h = restart(h, p.clone());
    h.write(1, 0, &pattern(1, 4096), true).unwrap();
    let id = writeboost_engine::LogId(h.engine().status().last_flushed_id);
    let (mut c, b) = shut_down(h);
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    let at = geo.segment_offset(id) as usize;
    let hl = geo.header_len();
    let (hdr, _) = verify_segment_header(&c[at..at + hl], &geo, &UUID).unwrap();
    assert!(hdr.epoch > 1);
    // The log's write was lost, and the position holds what an earlier
    // incarnation wrote there under the same id: intact, older data.
    let old = pattern(99, 4096);
    c[at + hl..at + hl + 4096].copy_from_slice(&old);
    let mbs = [Metablock {
        block: 0,
        valid: 0xff,
        dirty: true,
        crc: crc32c(&old),
    }];
    encode_segment_header(
        &mut c[at..at + hl],
        &geo,
        id.get(),
        hdr.epoch - 1,
        0,
        &UUID,
        &mbs,
    );
    let mut h = open(p, SimDevice::from_image(c), SimDevice::from_image(b));
    assert_eq!(h.engine().stats().checkpoints_loaded, 1);
    assert_eq!(h.read(2, 0, 4096), Err(IoError::Corrupt));
}

#[test]
fn dirty_sectors_a_fill_cannot_read_are_never_served_from_the_backing_device() {
    let p = params(8 * MIB);
    let mut h = fresh(p);
    // Block 3 dirty in a durable log, then a write to part of it: the rest
    // must be read back from the cache device, which fails that read.
    h.write(1, 3 * 4096, &pattern(1, 4096), true).unwrap();
    let id = writeboost_engine::LogId(h.engine().status().last_flushed_id);
    let geo = *h.engine().geometry();
    let at = geo.segment_offset(id);
    h.fail_cache_reads_in = Some(at..at + geo.segment_size);
    // (Acknowledged from the buffer; its fill read comes after.)
    h.write(2, 3 * 4096, &pattern(2, 512), false).unwrap();
    h.settle(1_000_000_000);
    h.fail_cache_reads_in = None;
    assert!(h.engine().is_read_only());
    // The sectors it could not carry read as an error (the device's, not
    // damage at rest), not as zeroes.
    assert_eq!(h.read(3, 3 * 4096 + 1024, 512), Err(IoError::CacheDevice));
    assert_eq!(h.engine().quarantined_blocks(), vec![3]);
}

#[test]
fn a_stale_pool_after_a_mode_1_clean_shutdown_is_refused_untouched() {
    let p = pool_params(8 * MIB);
    let mut h = open_pool(
        p.clone(),
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        Some(pool(3)),
    );
    assert_eq!(h.opened, Some(Ok(())));
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // The pool as it was before any write: formatted for this cache.
    let stale = h.pmem.as_ref().unwrap().crash(&mut rng);
    // Acknowledged from pmem, left there (a partial buffer) by a clean shutdown.
    h.write(1, 0, &pattern(1, 8192), false).unwrap();
    h.driver.engine_mut().shutdown(h.now);
    h.drain();
    while !h.shut_down {
        assert!(h.step(), "shutdown stuck");
    }
    let current = h.pmem.as_ref().unwrap().crash(&mut rng);
    let (c, b) = (h.cache.image().to_vec(), h.backing.image().to_vec());
    // Given the older copy of the pool, start-up says so and writes nothing.
    let h = open_pool(
        p.clone(),
        SimDevice::from_image(c.clone()),
        SimDevice::from_image(b.clone()),
        Some(SimPmem::from_image(stale)),
    );
    let Some(Err(e @ OpenError::PoolStale { blocks: 2, .. })) = &h.opened else {
        panic!("{:?}", h.opened);
    };
    assert!(e.to_string().contains("pool file"));
    assert_eq!(h.cache.image(), &c[..]);
    // The pool it ran with brings every acknowledged write back.
    let mut h = open_pool(
        p,
        SimDevice::from_image(c),
        SimDevice::from_image(b),
        Some(SimPmem::from_image(current)),
    );
    assert_eq!(h.opened, Some(Ok(())));
    assert_eq!(h.engine().stats().checkpoints_loaded, 1);
    assert_eq!(h.read(2, 0, 8192).unwrap(), pattern(1, 8192));
}

#[test]
fn a_log_left_unwritten_by_a_failed_fill_is_never_counted_durable() {
    use writeboost_engine::driver::UserOp;
    let mut p = params(8 * MIB);
    p.tunables.barrier_deadline_ms = 49;
    // Cache reads take 50 ms and flushes 5 ms.
    let slow = Latency {
        cache_read: 50_000_000,
        cache_flush: 5_000_000,
        ..lat()
    };
    let mut h = Harness::new(p, SimDevice::new(8 * MIB), SimDevice::new(BACKING), slow, 7);
    assert!(h.wait_open());
    // Block 3 dirty in a durable log.
    h.write(1, 3 * 4096, &pattern(1, 4096), true).unwrap();
    let old = writeboost_engine::LogId(h.engine().status().last_flushed_id);
    let geo = *h.engine().geometry();
    let at = geo.segment_offset(old);
    // Reading the older copy back fails: four tries of 50 ms.
    h.fail_cache_reads_in = Some(at..at + geo.segment_size);
    let submit = |h: &mut Harness, req: u64, block: u64, len: usize, fua: bool| {
        let now = h.now;
        h.driver
            .submit(
                ReqId(req),
                UserOp::Write {
                    offset: block * 4096,
                    fua,
                },
                pattern(req as u8, len),
                now,
            )
            .map_err(|(e, _)| e)
            .unwrap();
        h.drain();
    };
    // Part of block 3: its other sectors must be filled in from the old log.
    let start = h.now;
    submit(&mut h, 2, 3, 512, false);
    // A FUA write in the same log: sealed after 49 ms, it waits for the fill.
    submit(&mut h, 3, 10, 4096, true);
    // After the third failed try (150 ms), a FUA write in the next log:
    // sealed at 199 ms, its flush is in flight when the fill fails at 200.
    while h.now < start + 150_000_000 {
        assert!(h.step());
    }
    submit(&mut h, 4, 20, 4096, true);
    // The fill fails: the cache goes read-only, and the log waiting for it
    // is never written, so the write in it is not durable and must say so,
    // even after the later log's flush completes.
    assert_eq!(h.wait(ReqId(3)).0, Err(IoError::CacheDevice));
    assert!(h.engine().is_read_only());
    let _ = h.wait(ReqId(4));
    h.settle(1_000_000_000);
    assert!(
        h.engine().status().last_flushed_id <= old.get(),
        "the frontier passed the log that was never written: {:?}",
        h.engine().status()
    );
    assert_eq!(h.read(5, 10 * 4096, 4096).unwrap(), pattern(3, 4096));
}

/// A quarantined block, whose damaged copy writeback has passed (the
/// record lists it), is rewritten whole; background writeback then passes
/// later logs and a record is written, and power fails before the rewrite
/// is durable.
/// What block 1 reads afterwards.
fn read_after_a_lost_rewrite(
    mutant: writeboost_engine::mutant::Mutant,
) -> Result<Vec<u8>, IoError> {
    let mut p = params(8 * MIB);
    p.tunables.sync_data_interval = 0;
    p.tunables.writeback_delay_ms = 0;
    p.tunables.writeback_threshold = 100;
    p.tunables.update_sb_record_interval = 1;
    // (Written with the defaults: nothing reaches the backing device.)
    let (mut c, b, middle) = three_durable_logs(&params(8 * MIB));
    let geo = Geometry::new(128 << 10, 8 * MIB, BACKING).unwrap();
    c[geo.segment_offset(middle) as usize + geo.header_len() + 100] ^= 4;
    let mut h = open(
        p.clone(),
        SimDevice::from_image(c),
        SimDevice::from_image(b),
    );
    h.driver.engine_mut().plant(mutant);
    assert_eq!(h.read(1, 4096, 4096), Err(IoError::Corrupt));
    // Background writeback passes the damaged copy's log.
    h.settle(3_000_000_000);
    assert!(h.engine().status().recorded_writeback_id > middle.get());
    // Two more durable logs, then the rewrite, left in the buffer.
    h.write(2, 50 * 4096, &pattern(5, 4096), true).unwrap();
    h.write(3, 51 * 4096, &pattern(6, 4096), true).unwrap();
    let later = h.engine().status().last_flushed_id;
    h.write(4, 4096, &pattern(9, 4096), false).unwrap();
    // Writeback passes the two logs, and a record says so.
    h.settle(3_000_000_000);
    assert!(h.engine().status().recorded_writeback_id >= later);
    let mut h = power_loss(h, p);
    h.read(5, 4096, 4096)
}

#[test]
fn a_rewrite_ends_a_quarantine_only_once_it_is_durable() {
    use writeboost_engine::mutant::Mutant;
    // The rewrite is lost: the block is quarantined again, never read as
    // the backing device's older data.
    assert_eq!(
        read_after_a_lost_rewrite(Mutant::None),
        Err(IoError::Corrupt)
    );
    // The planted bug that ends the quarantine at the rewrite is caught:
    // the block reads as the backing device's zeroes, older than the
    // acknowledged, durable write the damaged copy held.
    assert_eq!(
        read_after_a_lost_rewrite(Mutant::QuarantineClearedEarly),
        Ok(vec![0; 4096]),
        "quarantine-cleared-early no longer shows"
    );
}

/// Random rewrites of `hot` blocks (a share of the cache), `n` of them, at
/// queue depth 1, then a FLUSH; returns the last pattern seed of each block.
fn rewrite_hot_set(h: &mut Harness, hot: u64, n: u64, first_req: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut last = vec![0u8; hot as usize];
    for i in 0..n {
        let block = rng.random_range(0..hot);
        let seed = (i % 251) as u8 + 1;
        h.write(first_req + i, block * 4096, &pattern(seed, 4096), false)
            .unwrap();
        last[block as usize] = seed;
    }
    h.flush(first_req + n).unwrap();
    last
}

fn expect_hot_set(h: &mut Harness, last: &[u8], first_req: u64) {
    for (block, &seed) in last.iter().enumerate() {
        if seed == 0 {
            continue;
        }
        assert_eq!(
            h.read(first_req + block as u64, block as u64 * 4096, 4096)
                .unwrap(),
            pattern(seed, 4096),
            "block {block}"
        );
    }
}

#[test]
fn a_hot_set_is_cleaned_in_the_cache_and_survives_power_loss() {
    // 31 segments of 31 blocks; a hot set of a third of the cache,
    // rewritten ten times over, with no background writeback.
    let run = |clean_pct: u32, clean_min_writeback_us: u32| {
        let mut p = params(4 * MIB);
        p.tunables.writeback_threshold = 0;
        p.tunables.bypass_write_kib = 0;
        p.tunables.clean_max_live_pct = clean_pct;
        p.tunables.clean_min_writeback_us = clean_min_writeback_us;
        let mut h = fresh(p.clone());
        let last = rewrite_hot_set(&mut h, 320, 3200, 100);
        let s = h.engine().stats().clone();
        let mut h = power_loss(h, p);
        expect_hot_set(&mut h, &last, 5000);
        s
    };
    let cleaned = run(50, 0);
    let written_back = run(0, 0);
    // Writing a block back to this backing device costs about 10 µs (100 µs
    // writes, 16 at a time, and a flush per batch): below the default
    // threshold, so the ring is freed by writeback, and the cache not worn.
    let fast_backing = run(50, 20);
    assert_eq!(fast_backing.relocated_blocks, 0, "{fast_backing:?}");
    assert!(cleaned.relocated_blocks > 0, "the cleaner ran: {cleaned:?}");
    assert_eq!(written_back.relocated_blocks, 0);
    assert!(
        cleaned.backing_write_cmds * 4 < written_back.backing_write_cmds,
        "cleaning spares the backing device: {} writes against {}",
        cleaned.backing_write_cmds,
        written_back.backing_write_cmds
    );
    assert!(
        cleaned.cache_write_amplification() < 2.0,
        "copies cost less than a second write each: {}",
        cleaned.cache_write_amplification()
    );
}

#[test]
fn cold_blocks_go_home_after_max_relocations() {
    let mut p = params(MIB);
    p.tunables.writeback_threshold = 0;
    p.tunables.bypass_write_kib = 0;
    p.tunables.max_relocations = 1;
    p.tunables.clean_min_writeback_us = 0;
    let mut h = fresh(p.clone());
    // Twenty cold blocks, written once, far from the hot set.
    for b in 0..20u64 {
        h.write(10 + b, (1000 + b) * 4096, &pattern(200, 4096), false)
            .unwrap();
    }
    let last = rewrite_hot_set(&mut h, 60, 900, 100);
    let s = h.engine().stats().clone();
    assert!(s.relocated_blocks > 0);
    assert!(
        s.writeback_blocks >= 20,
        "cold blocks were written back: {s:?}"
    );
    let mut h = power_loss(h, p);
    expect_hot_set(&mut h, &last, 5000);
    for b in 0..20u64 {
        assert_eq!(
            h.read(6000 + b, (1000 + b) * 4096, 4096).unwrap(),
            pattern(200, 4096)
        );
    }
}

/// Block 7 is written through the engine (landing after four slots granted
/// to a core), then rewritten by that core into the first granted slot,
/// durably; then the power fails. What block 7 reads as afterwards.
fn read_after_an_older_slot_is_published(
    persistent: bool,
    mutant: writeboost_engine::mutant::Mutant,
) -> Vec<u8> {
    let p = if persistent {
        pool_params(8 * MIB)
    } else {
        params(8 * MIB)
    };
    let pm = persistent.then(|| pool(3));
    let mut h = open_pool(
        p.clone(),
        SimDevice::new(8 * MIB),
        SimDevice::new(BACKING),
        pm,
    );
    h.driver.engine_mut().plant(mutant);
    let now = h.now;
    let g = h.driver.engine_mut().grant(4, now).expect("a grant");
    assert_eq!(g.count, 4);
    h.write(1, 7 * 4096, &pattern(1, 4096), false).unwrap();
    // The core's copy of the newer data, into the older slot.
    let newer = pattern(2, 4096);
    h.driver.engine_mut().buffer_mut(g.buf)[g.offset..g.offset + 4096].copy_from_slice(&newer);
    let now = h.now;
    h.driver
        .submit_granted(
            ReqId(2),
            7 * 4096,
            g.log,
            g.first_slot,
            &[crc32c(&newer)],
            true,
            Vec::new(),
            now,
        )
        .map_err(|(e, _)| e)
        .unwrap();
    let now = h.now;
    h.driver
        .engine_mut()
        .return_grant(g.log, g.first_slot + 1, 3, now);
    assert_eq!(h.wait(ReqId(2)).0, Ok(()));
    assert_eq!(h.read(3, 7 * 4096, 4096).unwrap(), newer);
    if !persistent {
        assert_eq!(h.engine().stats().returned_slots, 3);
    }
    let pimg = h
        .pmem
        .as_ref()
        .map(|pm| pm.crash(&mut ChaCha8Rng::seed_from_u64(2)));
    let (c, b) = h.crash(&mut ChaCha8Rng::seed_from_u64(2));
    let mut h2 = open_pool(
        p,
        SimDevice::from_image(c),
        SimDevice::from_image(b),
        pimg.map(SimPmem::from_image),
    );
    assert_eq!(h2.opened, Some(Ok(())));
    h2.read(4, 7 * 4096, 4096).unwrap()
}

#[test]
fn a_write_published_into_an_older_granted_slot_survives_replay() {
    use writeboost_engine::mutant::Mutant;
    for persistent in [false, true] {
        // Placed again at the head: replay finds the newer data last.
        assert_eq!(
            read_after_an_older_slot_is_published(persistent, Mutant::None),
            pattern(2, 4096),
            "mode {}",
            persistent as u8
        );
        // Indexed where it was copied, the acknowledged durable write is
        // lost to the older copy at a later position.
        assert_eq!(
            read_after_an_older_slot_is_published(persistent, Mutant::GrantedPublishedInPlace),
            pattern(1, 4096),
            "granted-published-in-place no longer shows in mode {}",
            persistent as u8
        );
    }
}

#[test]
fn grants_are_refused_when_unusable_and_padding_replays_as_nothing() {
    let mut h = fresh(params(8 * MIB));
    let now = h.now;
    let g = h.driver.engine_mut().grant(8, now).expect("a grant");
    // A slot never granted, or granted twice over, is refused.
    let refused = h
        .driver
        .submit_granted(
            ReqId(1),
            0,
            g.log,
            g.first_slot + 8,
            &[0],
            false,
            Vec::new(),
            now,
        )
        .unwrap_err()
        .0;
    assert!(refused.to_string().contains("not reserved"), "{refused}");
    let data = pattern(3, 2 * 4096);
    h.driver.engine_mut().buffer_mut(g.buf)[g.offset..g.offset + data.len()].copy_from_slice(&data);
    let crcs: Vec<u32> = data.chunks(4096).map(crc32c).collect();
    h.driver
        .submit_granted(
            ReqId(2),
            40 * 4096,
            g.log,
            g.first_slot,
            &crcs,
            false,
            Vec::new(),
            now,
        )
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(h.wait(ReqId(2)).0, Ok(()));
    assert!(
        h.driver
            .submit_granted(
                ReqId(3),
                0,
                g.log,
                g.first_slot,
                &crcs,
                false,
                Vec::new(),
                now
            )
            .is_err(),
        "published slots are not granted any more"
    );
    // The flush seals the log once the six unused slots come back.
    h.driver
        .submit(
            ReqId(4),
            writeboost_engine::driver::UserOp::Flush,
            Vec::new(),
            now,
        )
        .map_err(|(e, _)| e)
        .unwrap();
    // (At the barrier deadline.)
    for _ in 0..100 {
        if h.engine().grants_wanted_back() == g.log {
            break;
        }
        assert!(h.step());
    }
    assert_eq!(h.engine().grants_wanted_back(), g.log);
    assert_eq!(h.engine().reserved_slots(), 6);
    let now = h.now;
    h.driver
        .engine_mut()
        .return_grant(g.log, g.first_slot + 2, 6, now);
    assert_eq!(h.wait(ReqId(4)).0, Ok(()));
    assert_eq!(h.engine().reserved_slots(), 0);
    // The log's six padding slots replay as nothing.
    let mut h2 = power_loss(h, params(8 * MIB));
    assert_eq!(h2.read(5, 40 * 4096, 2 * 4096).unwrap(), data);
    assert_eq!(h2.engine().status().nr_dirty_blocks, 2);
}
