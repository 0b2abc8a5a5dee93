//! Result shapes: what `bdev_writeboost_get_stats` returns per device, and
//! the `writeboost` object of `bdev_get_bdevs`' `driver_specific`.

use serde_json::{Map, Value, json};
use writeboost_engine::config::BufferMode;
use writeboost_engine::{BufAlloc, Engine, Stats, Status, Tunables};

use crate::params::{CreateRequest, mode_number};

/// One writeboost device as reported over RPC.
pub struct DeviceReport<'a> {
    pub name: &'a str,
    pub backing_bdev: &'a str,
    pub cache_bdev: &'a str,
    pub mode: BufferMode,
    pub pmem_path: Option<&'a str>,
    /// Whether the pmem pool really is persistent memory (DAX); `None` without a pool.
    pub pmem_is_dax: Option<bool>,
    pub stats: &'a Stats,
    pub status: &'a Status,
    pub tunables: &'a Tunables,
}

/// The report of a create still waiting for its base bdevs, as every host
/// gives it.
pub fn waiting_report(req: &CreateRequest) -> Value {
    json!({
        "name": req.name,
        "backing_bdev": req.backing_bdev,
        "cache_bdev": req.cache_bdev,
        "state": "waiting_for_base_bdevs",
    })
}

/// The report of a device created by `req` whose engine is `engine`, as
/// every host gives it.
pub fn device_report<A: BufAlloc>(
    req: &CreateRequest,
    engine: &Engine<A>,
    pmem_is_dax: Option<bool>,
) -> Value {
    let status = engine.status();
    report_json(&DeviceReport {
        name: &req.name,
        backing_bdev: &req.backing_bdev,
        cache_bdev: &req.cache_bdev,
        mode: req.mode,
        pmem_path: req.pmem_path.as_deref(),
        pmem_is_dax,
        stats: engine.stats(),
        status: &status,
        tunables: engine.tunables(),
    })
}

/// `{name, backing_bdev, cache_bdev, mode, pmem_path, state, status, tunables, stats}`.
pub fn report_json(r: &DeviceReport<'_>) -> Value {
    let state = if r.status.read_only {
        "read_only"
    } else if r.status.drop_caches_active {
        "dropping_caches"
    } else {
        "online"
    };
    json!({
        "name": r.name,
        "backing_bdev": r.backing_bdev,
        "cache_bdev": r.cache_bdev,
        "mode": mode_number(r.mode),
        "pmem_path": r.pmem_path,
        "pmem_is_dax": r.pmem_is_dax,
        "state": state,
        "status": status_json(r.status),
        "tunables": tunables_json(r.tunables),
        "stats": stats_json(r.stats),
    })
}

/// Every tunable by name.
pub fn tunables_json(t: &Tunables) -> Value {
    let mut m = Map::new();
    for (name, value) in t.values() {
        let v = if name == "write_around_mode" {
            json!(value == 1)
        } else {
            json!(value)
        };
        m.insert(name.into(), v);
    }
    Value::Object(m)
}

/// Where the cache is and what it holds.
pub fn status_json(s: &Status) -> Value {
    json!({
        "cache_uuid": uuid_string(&s.cache_uuid),
        "segment_size": s.segment_size,
        "data_blocks_per_segment": s.data_blocks_per_segment,
        "nr_segments": s.nr_segments,
        "cursor": s.cursor,
        "current_id": s.current_id,
        "next_segment_id": s.next_segment_id,
        "last_flushed_id": s.last_flushed_id,
        "last_writeback_id": s.last_writeback_id,
        "recorded_writeback_id": s.recorded_writeback_id,
        "nr_dirty_blocks": s.nr_dirty_blocks,
        "dirty_pct": s.dirty_pct,
        "writeback_blocks_per_s": s.writeback_blocks_per_s,
        "writeback_ios_per_s": s.writeback_ios_per_s,
        "nr_cached_blocks": s.nr_cached_blocks,
        "index_bytes": s.index_bytes,
        "unchecked_logs": s.unchecked_logs,
        "corrupt_blocks": s.corrupt_blocks,
        "nr_free_buffers": s.nr_free_buffers,
        "stalled_writes": s.stalled_writes,
        "read_only": s.read_only,
        "backing_writes_lost": s.backing_writes_lost,
        "drop_caches_active": s.drop_caches_active,
        "writeback_active": s.writeback_active,
        "epoch": s.epoch,
    })
}

/// dm-writeboost's 16 per-4-KiB counters, named
/// `{read|write}_{hit|miss}_{buffer|cache}_{full|partial}`.
pub fn io_counters_json(stats: &Stats) -> Value {
    let mut m = Map::new();
    for (w, rw) in ["read", "write"].into_iter().enumerate() {
        for (h, hit) in ["miss", "hit"].into_iter().enumerate() {
            for (b, place) in ["cache", "buffer"].into_iter().enumerate() {
                for (f, size) in ["partial", "full"].into_iter().enumerate() {
                    m.insert(
                        format!("{rw}_{hit}_{place}_{size}"),
                        json!(stats.io[w][h][b][f]),
                    );
                }
            }
        }
    }
    Value::Object(m)
}

fn stats_json(s: &Stats) -> Value {
    let mut v = json!({
        "io": io_counters_json(s),
        "nr_logs": s.nr_logs,
        "nr_partial_flushed": s.nr_partial_flushed,
        "user_write_cmds": s.user_write_cmds,
        "user_write_bytes": s.user_write_bytes,
        "user_read_cmds": s.user_read_cmds,
        "user_read_bytes": s.user_read_bytes,
        "user_flush_cmds": s.user_flush_cmds,
        "cache_write_cmds": s.cache_write_cmds,
        "cache_write_bytes": s.cache_write_bytes,
        "cache_read_cmds": s.cache_read_cmds,
        "cache_read_bytes": s.cache_read_bytes,
        "cache_flush_cmds": s.cache_flush_cmds,
        "backing_write_cmds": s.backing_write_cmds,
        "backing_write_bytes": s.backing_write_bytes,
        "backing_read_cmds": s.backing_read_cmds,
        "backing_read_bytes": s.backing_read_bytes,
        "backing_flush_cmds": s.backing_flush_cmds,
        "bypass_write_bytes": s.bypass_write_bytes,
        "read_cache_staged": s.read_cache_staged,
        "io_retries": s.io_retries,
        "writeback_errors": s.writeback_errors,
        "backing_flush_failures": s.backing_flush_failures,
        "scrub_read_errors": s.scrub_read_errors,
        "quarantine_moves": s.quarantine_moves,
        "sb_record_writes": s.sb_record_writes,
        "salvaged_logs_skipped": s.salvaged_logs_skipped,
        "checkpoints_loaded": s.checkpoints_loaded,
        "checkpoints_rejected": s.checkpoints_rejected,
        "corrupt_blocks_found": s.corrupt_blocks_found,
        "cache_writes_per_user_write": s.cache_writes_per_user_write(),
        "cache_write_amplification": s.cache_write_amplification(),
        "relocated_blocks": s.relocated_blocks,
        "writeback_blocks": s.writeback_blocks,
        "writeback_ios": s.writeback_ios,
        "writeback_blocks_per_io": s.writeback_blocks as f64 / s.writeback_ios.max(1) as f64,
        "admission_bypass_writes": s.admission_bypass_writes,
        "throttled_writes": s.throttled_writes,
        "throttled_ns": s.throttled_ns,
        "latency_us": latency_json(s),
    });
    // (One json! literal that long would pass the macro's recursion limit.)
    let m = v.as_object_mut().expect("object literal");
    m.insert("granted_slots".into(), json!(s.granted_slots));
    m.insert("granted_writes".into(), json!(s.granted_writes));
    m.insert("granted_returned_slots".into(), json!(s.returned_slots));
    m.insert("granted_replaced".into(), json!(s.granted_replaced));
    v
}

/// Per operation: requests completed and latency percentiles in µs, as the
/// engine saw them (submission to completion, host queueing not included).
fn latency_json(s: &Stats) -> Value {
    let mut m = Map::new();
    for (name, h) in ["read", "write", "flush"].into_iter().zip(&s.latency) {
        let us = |q: f64| h.percentile(q) as f64 / 1000.0;
        m.insert(
            name.into(),
            json!({
                "count": h.count(),
                "p50": us(0.50),
                "p99": us(0.99),
                "p999": us(0.999),
            }),
        );
    }
    Value::Object(m)
}

/// A UUID in its canonical text form (8-4-4-4-12 lowercase hex).
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_every_section_and_16_io_counters() {
        let mut stats = Stats::default();
        stats.io[1][0][1][1] = 7;
        let status = Status {
            cache_uuid: [0xab; 16],
            ..Status::default()
        };
        let t = Tunables::default();
        let v = report_json(&DeviceReport {
            name: "wb0",
            backing_bdev: "B",
            cache_bdev: "C",
            mode: BufferMode::Volatile,
            pmem_path: None,
            pmem_is_dax: None,
            stats: &stats,
            status: &status,
            tunables: &t,
        });
        assert_eq!(v["state"], "online");
        assert_eq!(v["mode"], 0);
        assert_eq!(v["stats"]["io"].as_object().unwrap().len(), 16);
        assert_eq!(v["stats"]["io"]["write_miss_buffer_full"], 7);
        assert_eq!(v["tunables"]["write_around_mode"], false);
        assert_eq!(
            v["status"]["cache_uuid"],
            "abababab-abab-abab-abab-abababababab"
        );
    }
}
