//! Configuration files: what to create at start-up, as a list of RPC calls.
//!
//! Two shapes are accepted, in YAML or JSON (JSON is YAML):
//!
//! - the host's own, one list per kind, created in this order:
//!
//!   ```yaml
//!   aio:        [{name: Backing0, filename: /var/lib/wb/backing.img}]
//!   malloc:     [{name: Cache0, num_blocks: 65536, block_size: 4096}]
//!   writeboost: [{name: wb0, backing_bdev: Backing0, cache_bdev: Cache0}]
//!   nbd:        [{bdev_name: wb0, listen: "127.0.0.1:10809"}]
//!   ```
//!
//!   each entry holding the parameters of `bdev_aio_create`,
//!   `bdev_malloc_create`, `bdev_writeboost_create` and `nbd_server_start`;
//! - SPDK's, as `save_config` writes it:
//!   `{"subsystems": [{"subsystem": "bdev", "config": [{"method": ..., "params": ...}]}, ...]}`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use thiserror::Error;

/// One call to make: a method and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    pub params: Value,
}

impl Call {
    pub fn new(method: &str, params: Value) -> Self {
        Self {
            method: method.to_string(),
            params,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid YAML or JSON: {msg}")]
    Syntax { path: PathBuf, msg: String },
    #[error("configuration file {path}: {msg}")]
    Shape { path: PathBuf, msg: String },
}

/// The host's own sections, in the order they are created.
const SECTIONS: [(&str, &str); 4] = [
    ("aio", "bdev_aio_create"),
    ("malloc", "bdev_malloc_create"),
    ("writeboost", "bdev_writeboost_create"),
    ("nbd", "nbd_server_start"),
];

/// SPDK subsystems whose settings do not apply to this host; they are skipped.
const IGNORED_SUBSYSTEMS: [&str; 12] = [
    "accel",
    "iobuf",
    "sock",
    "vmd",
    "keyring",
    "scheduler",
    "fsdev",
    "vfio_user_target",
    "ublk",
    "scsi",
    "iscsi",
    "nvmf",
];

pub fn load(path: &Path) -> Result<Vec<Call>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        Parsed::Syntax(msg) => ConfigError::Syntax {
            path: path.to_owned(),
            msg,
        },
        Parsed::Shape(msg) => ConfigError::Shape {
            path: path.to_owned(),
            msg,
        },
    })
}

#[derive(Debug)]
pub enum Parsed {
    Syntax(String),
    Shape(String),
}

/// Parses configuration text (see the module documentation).
pub fn parse(text: &str) -> Result<Vec<Call>, Parsed> {
    let v: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| Parsed::Syntax(e.to_string()))?
    } else {
        yaml_serde::from_str(text).map_err(|e| Parsed::Syntax(e.to_string()))?
    };
    let map = match v {
        Value::Object(m) => m,
        Value::Null => return Ok(Vec::new()),
        _ => {
            return Err(Parsed::Shape(
                "the top level must be a mapping (sections aio, malloc, writeboost, nbd; or \
                 SPDK's \"subsystems\")"
                    .into(),
            ));
        }
    };
    if map.contains_key("subsystems") {
        spdk_shape(map)
    } else {
        own_shape(map)
    }
}

fn own_shape(mut map: Map<String, Value>) -> Result<Vec<Call>, Parsed> {
    let mut calls = Vec::new();
    for (section, method) in SECTIONS {
        match map.remove(section) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for params in items {
                    if !params.is_object() {
                        return Err(Parsed::Shape(format!(
                            "each entry of '{section}' must be a mapping of {method} parameters, \
                             got {params}"
                        )));
                    }
                    calls.push(Call::new(method, params));
                }
            }
            Some(other) => {
                return Err(Parsed::Shape(format!(
                    "'{section}' must be a list of {method} parameter mappings, got {other}"
                )));
            }
        }
    }
    if let Some(k) = map.keys().next() {
        return Err(Parsed::Shape(format!(
            "unknown section '{k}'; the sections are aio, malloc, writeboost and nbd"
        )));
    }
    Ok(calls)
}

fn spdk_shape(mut map: Map<String, Value>) -> Result<Vec<Call>, Parsed> {
    let Some(Value::Array(subs)) = map.remove("subsystems") else {
        return Err(Parsed::Shape("'subsystems' must be a list".into()));
    };
    let mut calls = Vec::new();
    for sub in subs {
        let name = sub
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| Parsed::Shape("each subsystem needs a 'subsystem' name".into()))?
            .to_string();
        let config = match sub.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(c)) => c.clone(),
            Some(_) => {
                return Err(Parsed::Shape(format!(
                    "subsystem '{name}': 'config' must be a list"
                )));
            }
        };
        if name != "bdev" && name != "nbd" {
            if !config.is_empty() && !IGNORED_SUBSYSTEMS.contains(&name.as_str()) {
                return Err(Parsed::Shape(format!(
                    "subsystem '{name}' is not served by this host (only bdev and nbd)"
                )));
            }
            continue;
        }
        for entry in config {
            let method = entry
                .get("method")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Parsed::Shape(format!(
                        "subsystem '{name}': each entry needs a 'method' string"
                    ))
                })?
                .to_string();
            // SPDK's own bdev-layer settings; nothing to apply here.
            if method.ends_with("_set_options") && method != "bdev_writeboost_set_options"
                || method == "bdev_nvme_set_hotplug"
            {
                continue;
            }
            let params = entry.get("params").cloned().unwrap_or(Value::Null);
            calls.push(Call { method, params });
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn own_shape_in_yaml_in_section_order() {
        let calls = parse(
            "nbd:\n  - {bdev_name: wb0, listen: \"127.0.0.1:0\"}\n\
             writeboost:\n  - name: wb0\n    backing_bdev: B\n    cache_bdev: C\n    mode: 0\n\
             malloc:\n  - {name: C, num_blocks: 1024, block_size: 4096}\n\
             aio:\n  - {name: B, filename: /tmp/b.img}\n",
        )
        .unwrap();
        let methods: Vec<&str> = calls.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(
            methods,
            [
                "bdev_aio_create",
                "bdev_malloc_create",
                "bdev_writeboost_create",
                "nbd_server_start"
            ]
        );
        assert_eq!(calls[1].params["num_blocks"], json!(1024));
        assert_eq!(calls[2].params["mode"], json!(0));
    }

    #[test]
    fn spdk_shape_skips_foreign_settings() {
        let text = r#"{"subsystems": [
            {"subsystem": "accel", "config": [{"method": "accel_set_options", "params": {}}]},
            {"subsystem": "bdev", "config": [
                {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535}},
                {"method": "bdev_malloc_create", "params": {"name": "C", "num_blocks": 8, "block_size": 512}},
                {"method": "bdev_wait_for_examine"}]},
            {"subsystem": "nbd", "config": []}]}"#;
        let calls = parse(text).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].method, "bdev_malloc_create");
        assert_eq!(calls[1].method, "bdev_wait_for_examine");
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        for (text, want) in [
            ("[1, 2]", "top level must be a mapping"),
            ("aio: {name: x}", "'aio' must be a list"),
            ("aio: [5]", "must be a mapping"),
            ("disks: []", "unknown section 'disks'"),
            ("{\"subsystems\": 3}", "'subsystems' must be a list"),
            (
                "{\"subsystems\": [{\"subsystem\": \"vhost_blk\", \"config\": [{\"method\": \"x\"}]}]}",
                "not served by this host",
            ),
        ] {
            match parse(text) {
                Err(Parsed::Shape(m)) => assert!(m.contains(want), "{text}: {m}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(parse("aio: [ {"), Err(Parsed::Syntax(_))));
        assert!(matches!(parse("{\"a\": "), Err(Parsed::Syntax(_))));
        assert!(parse("").unwrap().is_empty());
    }
}
