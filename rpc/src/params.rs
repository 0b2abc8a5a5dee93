//! Parameter checking for the `bdev_writeboost_*` methods.
//!
//! Parameters are read by hand from the JSON object rather than through a
//! derive so that every refusal names the method, the parameter and what was
//! expected, and unknown parameters are refused with the list of known ones.

use serde_json::{Map, Value, json};
use writeboost_engine::config::{BufferMode, TUNABLE_RANGES};
use writeboost_engine::geometry::{MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
use writeboost_engine::{BackingIdentity, OpenParams, Tunables};

use crate::RpcError;

/// The parameters of one call, consumed one by one; [`Params::finish`]
/// refuses whatever is left over.
pub struct Params<'a> {
    method: &'a str,
    map: Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Params<'a> {
    /// `params` must be an object, or absent (`None` / `null`) when
    /// `optional` is set.
    pub fn new(method: &'a str, params: Option<&Value>, optional: bool) -> Result<Self, RpcError> {
        let map = match params {
            Some(Value::Object(m)) => m.clone(),
            None | Some(Value::Null) if optional => Map::new(),
            None | Some(Value::Null) => {
                return Err(RpcError::invalid_params(format!(
                    "{method}: parameters are required (a JSON object)"
                )));
            }
            Some(other) => {
                return Err(RpcError::invalid_params(format!(
                    "{method}: parameters must be a JSON object, not {}",
                    kind(other)
                )));
            }
        };
        Ok(Self {
            method,
            map,
            known: Vec::new(),
        })
    }

    fn take(&mut self, name: &'static str) -> Option<Value> {
        self.known.push(name);
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn bad(&self, name: &str, expected: &str, got: &Value) -> RpcError {
        RpcError::invalid_params(format!(
            "{}: parameter '{name}' must be {expected}, got {}",
            self.method,
            short(got)
        ))
    }

    /// A non-empty string.
    pub fn string(&mut self, name: &'static str) -> Result<Option<String>, RpcError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
            Some(v) => Err(self.bad(name, "a non-empty string", &v)),
        }
    }

    /// A non-empty string that must be present.
    pub fn required_string(&mut self, name: &'static str) -> Result<String, RpcError> {
        self.string(name)?.ok_or_else(|| {
            RpcError::invalid_params(format!("{}: parameter '{name}' is required", self.method))
        })
    }

    /// A whole number within `min..=max`.
    pub fn uint(
        &mut self,
        name: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, RpcError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.bad(name, &format!("a whole number from {min} to {max}"), &v)),
            },
        }
    }

    /// A whole number, possibly negative, within `min..=max`.
    pub fn int(&mut self, name: &'static str, min: i64, max: i64) -> Result<Option<i64>, RpcError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.bad(name, &format!("a whole number from {min} to {max}"), &v)),
            },
        }
    }

    /// `true` or `false`.
    pub fn boolean(&mut self, name: &'static str) -> Result<Option<bool>, RpcError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.bad(name, "true or false", &v)),
        }
    }

    /// Every tunable given, checked against its range, in [`TUNABLE_RANGES`] order.
    pub fn tunables(&mut self) -> Result<Vec<(&'static str, u64)>, RpcError> {
        let mut out = Vec::new();
        for &(name, min, max) in &TUNABLE_RANGES {
            if name == "write_around_mode" {
                // Accept SPDK-style booleans as well as 0/1.
                match self.take(name) {
                    None => {}
                    Some(Value::Bool(b)) => out.push((name, b as u64)),
                    Some(v) => match v.as_u64() {
                        Some(n @ 0..=1) => out.push((name, n)),
                        _ => return Err(self.bad(name, "true, false, 0 or 1", &v)),
                    },
                }
            } else if let Some(v) = self.uint(name, min, max)? {
                out.push((name, v));
            }
        }
        Ok(out)
    }

    /// Refuses parameters nobody asked for.
    pub fn finish(self) -> Result<(), RpcError> {
        if let Some(extra) = self.map.keys().next() {
            return Err(RpcError::invalid_params(format!(
                "{}: unknown parameter '{extra}'; known parameters: {}",
                self.method,
                self.known.join(", ")
            )));
        }
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The offending value, cut short so a huge input cannot flood the reply.
fn short(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 64 {
        let mut end = 61;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// `bdev_writeboost_create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub name: String,
    pub backing_bdev: String,
    pub cache_bdev: String,
    pub mode: BufferMode,
    pub pmem_path: Option<String>,
    /// Reformat even if the cache bdev holds a valid cache.
    pub format: bool,
    /// Open past logs found damaged below the durable frontier (their
    /// blocks read as older contents) instead of refusing.
    pub salvage: bool,
    /// Segment size if the cache is formatted now.
    pub segment_size_kib: Option<u32>,
    /// Defaults with the given tunables applied.
    pub tunables: Tunables,
    /// Base bdevs that do not exist yet are waited for (the device is
    /// created when they appear) instead of being an error. A saved
    /// configuration sets it, since its entries may come in any order.
    pub wait_for_bdevs: bool,
    /// The core whose thread (SPDK) or reactor (standalone host) runs the
    /// device's engine; None places devices round robin over the cores.
    pub core: Option<u32>,
    /// SPDK only: the core of a thread of the device's own that starts and
    /// completes its base-bdev I/O (None, or `core`: the device's thread does).
    pub io_core: Option<u32>,
}

/// What the engine is told of a base bdev.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseGeometry {
    pub size: u64,
    pub block_size: u32,
}

impl CreateRequest {
    /// The engine's parameters for this request over these base bdevs;
    /// `backing_uuid` identifies the backing bdev, `new_cache_uuid` names
    /// the cache if it is formatted now.
    pub fn open_params(
        &self,
        cache: BaseGeometry,
        backing: BaseGeometry,
        backing_uuid: [u8; 16],
        new_cache_uuid: [u8; 16],
    ) -> OpenParams {
        let identity = BackingIdentity {
            uuid: backing_uuid,
            size: backing.size,
        };
        let mut params = OpenParams::new(cache.size, identity, new_cache_uuid);
        params.cache_block_size = cache.block_size;
        params.backing_block_size = backing.block_size;
        params.format = self.format;
        params.salvage = self.salvage;
        params.mode = self.mode;
        params.tunables = self.tunables;
        if let Some(kib) = self.segment_size_kib {
            params.segment_size = u64::from(kib) * 1024;
        }
        params
    }

    /// The parameters that recreate this device as it is now, for
    /// `save_config`. `format` and `salvage` are never emitted: replaying
    /// a saved configuration must not wipe the cache or pass over damage. `wait_for_bdevs` is: the
    /// base bdevs' entries may come later in the file.
    pub fn config_params(&self, tunables: &Tunables) -> Value {
        let mut p = json!({
            "name": self.name,
            "backing_bdev": self.backing_bdev,
            "cache_bdev": self.cache_bdev,
            "mode": mode_number(self.mode),
            "wait_for_bdevs": true,
        });
        let m = p.as_object_mut().expect("object literal");
        if let Some(path) = &self.pmem_path {
            m.insert("pmem_path".into(), json!(path));
        }
        if let Some(kib) = self.segment_size_kib {
            m.insert("segment_size_kib".into(), json!(kib));
        }
        if let Some(core) = self.core {
            m.insert("core".into(), json!(core));
        }
        if let Some(core) = self.io_core {
            m.insert("io_core".into(), json!(core));
        }
        for (name, value) in tunables.values() {
            m.insert(name.into(), json!(value));
        }
        p
    }
}

/// 0 for the volatile buffer, 1 for the pmem buffer.
pub fn mode_number(mode: BufferMode) -> u8 {
    match mode {
        BufferMode::Volatile => 0,
        BufferMode::Persistent => 1,
    }
}

/// The highest core number `core` may name (SPDK's own limit on cores).
pub const MAX_CORE: u64 = 1023;

/// Checks `bdev_writeboost_create` parameters.
pub fn parse_create(params: Option<&Value>) -> Result<CreateRequest, RpcError> {
    const METHOD: &str = "bdev_writeboost_create";
    let mut p = Params::new(METHOD, params, false)?;
    let name = p.required_string("name")?;
    let backing_bdev = p.required_string("backing_bdev")?;
    let cache_bdev = p.required_string("cache_bdev")?;
    let mode = match p.uint("mode", 0, 1)? {
        Some(1) => BufferMode::Persistent,
        _ => BufferMode::Volatile,
    };
    let pmem_path = p.string("pmem_path")?;
    let format = p.boolean("format")?.unwrap_or(false);
    let salvage = p.boolean("salvage")?.unwrap_or(false);
    let wait_for_bdevs = p.boolean("wait_for_bdevs")?.unwrap_or(false);
    let segment_size_kib = p
        .uint(
            "segment_size_kib",
            MIN_SEGMENT_SIZE / 1024,
            MAX_SEGMENT_SIZE / 1024,
        )?
        .map(|k| k as u32);
    let core = p.uint("core", 0, MAX_CORE)?.map(|c| c as u32);
    let io_core = p.uint("io_core", 0, MAX_CORE)?.map(|c| c as u32);
    let given = p.tunables()?;
    p.finish()?;

    if let Some(kib) = segment_size_kib
        && !kib.is_power_of_two()
    {
        return Err(RpcError::invalid_params(format!(
            "{METHOD}: segment_size_kib={kib} must be a power of two (64, 128, ... 4096)"
        )));
    }
    if backing_bdev == cache_bdev {
        return Err(RpcError::invalid_params(format!(
            "{METHOD}: backing_bdev and cache_bdev are both '{cache_bdev}'; give two different bdevs"
        )));
    }
    if name == backing_bdev || name == cache_bdev {
        return Err(RpcError::invalid_params(format!(
            "{METHOD}: name '{name}' is also a base bdev; pick another name"
        )));
    }
    if format && salvage {
        return Err(RpcError::invalid_params(format!(
            "{METHOD}: format and salvage exclude each other: format discards the cache, \
             salvage recovers it; give one"
        )));
    }
    if mode == BufferMode::Persistent && pmem_path.is_none() {
        return Err(RpcError::invalid_params(format!(
            "{METHOD}: mode 1 (pmem buffer) needs pmem_path, the pmem pool file or device"
        )));
    }
    let mut tunables = Tunables::default();
    for (k, v) in given {
        // Ranges were checked above; `set` cannot fail here.
        tunables
            .set(k, v)
            .map_err(|e| RpcError::invalid_params(format!("{METHOD}: {e}")))?;
    }
    Ok(CreateRequest {
        name,
        backing_bdev,
        cache_bdev,
        mode,
        pmem_path,
        format,
        salvage,
        segment_size_kib,
        tunables,
        wait_for_bdevs,
        core,
        io_core,
    })
}

/// `bdev_writeboost_set_options`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOptionsRequest {
    pub name: String,
    /// Tunables to change, already range-checked.
    pub changes: Vec<(&'static str, u64)>,
}

impl SetOptionsRequest {
    /// `current` with the changes applied; all or nothing.
    pub fn apply_to(&self, current: &Tunables) -> Result<Tunables, RpcError> {
        let mut t = *current;
        for &(k, v) in &self.changes {
            t.set(k, v).map_err(|e| {
                RpcError::invalid_params(format!("bdev_writeboost_set_options: {e}"))
            })?;
        }
        Ok(t)
    }
}

/// Checks `bdev_writeboost_set_options` parameters.
pub fn parse_set_options(params: Option<&Value>) -> Result<SetOptionsRequest, RpcError> {
    const METHOD: &str = "bdev_writeboost_set_options";
    let mut p = Params::new(METHOD, params, false)?;
    let name = p.required_string("name")?;
    let changes = p.tunables()?;
    p.finish()?;
    if changes.is_empty() {
        let names: Vec<_> = TUNABLE_RANGES.iter().map(|t| t.0).collect();
        return Err(RpcError::invalid_params(format!(
            "{METHOD}: give at least one tunable to change: {}",
            names.join(", ")
        )));
    }
    Ok(SetOptionsRequest { name, changes })
}

/// Methods that take just `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRequest {
    pub name: String,
}

/// Checks `{"name": ...}` (delete, drop_caches, clear_stats).
pub fn parse_name(method: &str, params: Option<&Value>) -> Result<NameRequest, RpcError> {
    let mut p = Params::new(method, params, false)?;
    let name = p.required_string("name")?;
    p.finish()?;
    Ok(NameRequest { name })
}

/// `{"name": ..., "block": ...}` (drop_quarantine): a 4 KiB block of the
/// backing device, as `bdev_writeboost_get_quarantine` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    pub name: String,
    pub block: u64,
}

pub fn parse_drop_quarantine(params: Option<&Value>) -> Result<BlockRequest, RpcError> {
    let method = "bdev_writeboost_drop_quarantine";
    let mut p = Params::new(method, params, false)?;
    let name = p.required_string("name")?;
    let block = p.uint("block", 0, u64::MAX)?.ok_or_else(|| {
        RpcError::invalid_params(format!(
            "{method}: missing \"block\" (a 4 KiB block number, as bdev_writeboost_get_quarantine lists them)"
        ))
    })?;
    p.finish()?;
    Ok(BlockRequest { name, block })
}

/// What `bdev_writeboost_drop_quarantine` answers: true, or an error saying
/// the block is not quarantined.
pub fn drop_quarantine_answer(req: &BlockRequest, dropped: bool) -> Result<Value, RpcError> {
    if dropped {
        return Ok(Value::Bool(true));
    }
    Err(RpcError::new(
        crate::code::ENOENT,
        format!(
            "bdev_writeboost_drop_quarantine {}: block {} is not quarantined; \
             bdev_writeboost_get_quarantine lists those that are",
            req.name, req.block
        ),
    ))
}

/// What `bdev_writeboost_get_quarantine` answers.
pub fn quarantine_json(blocks: &[u64]) -> Value {
    json!({"block_size": 4096, "blocks": blocks})
}

/// Checks an optional `{"name": ...}` (get_stats).
pub fn parse_optional_name(
    method: &str,
    params: Option<&Value>,
) -> Result<Option<String>, RpcError> {
    let mut p = Params::new(method, params, true)?;
    let name = p.string("name")?;
    p.finish()?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    const GEO: BaseGeometry = BaseGeometry {
        size: 1 << 30,
        block_size: 512,
    };
    use super::*;
    use crate::code;

    fn create(v: Value) -> Result<CreateRequest, RpcError> {
        parse_create(Some(&v))
    }

    #[test]
    fn create_defaults_to_mode_0_and_default_tunables() {
        let r = create(json!({"name": "wb0", "backing_bdev": "B", "cache_bdev": "C"})).unwrap();
        assert_eq!(r.mode, BufferMode::Volatile);
        assert_eq!(r.tunables, Tunables::default());
        assert!(!r.format);
    }

    #[test]
    fn create_applies_tunables_and_mode_1() {
        let r = create(
            json!({"name": "wb0", "backing_bdev": "B", "cache_bdev": "C",
            "mode": 1, "pmem_path": "/mnt/pmem/p", "barrier_deadline_ms": 0,
            "write_around_mode": true, "segment_size_kib": 512}),
        )
        .unwrap();
        assert_eq!(r.mode, BufferMode::Persistent);
        assert_eq!(r.tunables.barrier_deadline_ms, 0);
        assert!(r.tunables.write_around_mode);
        assert_eq!(r.segment_size_kib, Some(512));
    }

    #[test]
    fn create_refusals_name_the_parameter() {
        let cases = [
            (
                json!({"backing_bdev": "B", "cache_bdev": "C"}),
                "'name' is required",
            ),
            (
                json!({"name": 5, "backing_bdev": "B", "cache_bdev": "C"}),
                "'name' must be a non-empty string",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "mode": 2}),
                "'mode' must be a whole number from 0 to 1",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "mode": 1}),
                "needs pmem_path",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "B"}),
                "two different bdevs",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "bogus": 1}),
                "unknown parameter 'bogus'",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "writeback_threshold": 101}),
                "'writeback_threshold' must be a whole number from 0 to 100",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "segment_size_kib": 100}),
                "power of two",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "format": "yes"}),
                "'format' must be true or false",
            ),
            (
                json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "format": true,
                    "salvage": true}),
                "exclude each other",
            ),
            (json!(["w"]), "must be a JSON object, not an array"),
        ];
        for (v, want) in cases {
            let e = create(v.clone()).unwrap_err();
            assert_eq!(e.code, code::INVALID_PARAMS, "{v}");
            assert!(e.message.contains(want), "{v}: {}", e.message);
        }
        assert!(parse_create(None).unwrap_err().message.contains("required"));
    }

    #[test]
    fn config_params_round_trip_without_format_or_salvage() {
        // Each flag given once; replaying the saved entry drops it.
        type Field = fn(&mut CreateRequest) -> &mut bool;
        let flags: [(&str, Field); 2] = [
            ("format", |r| &mut r.format),
            ("salvage", |r| &mut r.salvage),
        ];
        for (flag, field) in flags {
            let mut r = create(
                json!({"name": "wb0", "backing_bdev": "B", "cache_bdev": "C",
                flag: true, "sync_data_interval": 7}),
            )
            .unwrap();
            assert!(*field(&mut r));
            let saved = r.config_params(&r.tunables);
            assert!(saved.get(flag).is_none());
            let again = create(saved).unwrap();
            // Replaying never formats or salvages, and waits for base
            // bdevs listed later.
            *field(&mut r) = false;
            r.wait_for_bdevs = true;
            assert_eq!(again, r);
        }
        let r = create(
            json!({"name": "wb0", "backing_bdev": "B", "cache_bdev": "C",
            "salvage": true}),
        )
        .unwrap();
        assert!(r.open_params(GEO, GEO, [1; 16], [2; 16]).salvage);
    }

    #[test]
    fn set_options_needs_a_change_and_applies_all_or_nothing() {
        let e = parse_set_options(Some(&json!({"name": "w"}))).unwrap_err();
        assert!(e.message.contains("at least one tunable"));
        let r = parse_set_options(Some(&json!({"name": "w", "writeback_threshold": 0}))).unwrap();
        let t = r.apply_to(&Tunables::default()).unwrap();
        assert_eq!(t.writeback_threshold, 0);
    }

    #[test]
    fn optional_name_accepts_absent_params() {
        assert_eq!(parse_optional_name("m", None).unwrap(), None);
        assert_eq!(
            parse_optional_name("m", Some(&json!({"name": "a"}))).unwrap(),
            Some("a".to_string())
        );
        assert!(parse_name("m", None).is_err());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "x".repeat(10_000);
        let e = create(json!({"name": "w", "backing_bdev": "B", "cache_bdev": "C", "mode": long}))
            .unwrap_err();
        assert!(e.message.len() < 200, "{}", e.message);
    }
}
