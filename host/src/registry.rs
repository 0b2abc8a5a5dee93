//! The host's registry and its JSON-RPC methods: base bdevs, writeboost
//! devices on reactors, NBD servers. Configuration files and the RPC socket
//! both go through [`App::call`], so a file can do exactly what RPC can.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::{Value, json};
use writeboost_rpc::{
    BaseGeometry, CreateRequest, METHODS, Params, RpcError, code, drop_quarantine_answer,
    parse_create, parse_drop_quarantine, parse_name, parse_optional_name, parse_set_options,
    quarantine_json,
};

use crate::backends::Devices;
use crate::bdev::{self, BaseBdev, BaseKind, BdevInfo, bdev_info};
use crate::device::DeviceSpec;
use crate::nbd::proto::{Export, TRANSMISSION_FLAGS};
use crate::nbd::server::{ServerCtx, spawn_tcp, spawn_unix};
use crate::reactor::ReactorHandle;
use crate::request::Shared;
use crate::store;

/// Every method the host serves, in the order `rpc_get_methods` lists them.
pub const HOST_METHODS: [&str; 15] = [
    "bdev_aio_create",
    "bdev_aio_delete",
    "bdev_malloc_create",
    "bdev_malloc_delete",
    "bdev_get_bdevs",
    "nbd_server_start",
    "nbd_server_stop",
    "save_config",
    "framework_get_subsystems",
    "framework_get_config",
    "spdk_get_version",
    "rpc_get_methods",
    "spdk_kill_instance",
    "framework_wait_init",
    "bdev_wait_for_examine",
];

/// What ends the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Finish requests in flight and close every device cleanly.
    Clean,
}

pub struct AppOpts {
    /// Try O_DIRECT on aio bdevs.
    pub direct: bool,
    pub verbose: bool,
    /// What `spdk_get_version` reports.
    pub build: crate::Build,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WbState {
    Opening,
    Online,
    Closing,
}

struct WbDev {
    req: CreateRequest,
    reactor: usize,
    shared: Arc<Shared>,
    state: WbState,
    size: u64,
    block_size: u32,
    cache_uuid: [u8; 16],
}

struct NbdServer {
    bdev_name: String,
    ctx: Arc<ServerCtx>,
    tcp: Option<SocketAddr>,
    /// A handle on the TCP listener, to wake its accepting thread.
    tcp_listener: Option<TcpListener>,
    socket: Option<PathBuf>,
    /// The accepting threads.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl NbdServer {
    fn urls(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(a) = self.tcp {
            v.push(format!("nbd://{a}/{}", self.bdev_name));
        }
        if let Some(p) = &self.socket {
            v.push(format!(
                "nbd+unix:///{}?socket={}",
                self.bdev_name,
                p.display()
            ));
        }
        v
    }

    fn params(&self) -> Value {
        let mut p = json!({"bdev_name": self.bdev_name});
        if let Some(a) = self.tcp {
            p["listen"] = json!(a.to_string());
        }
        if let Some(s) = &self.socket {
            p["socket"] = json!(s.to_string_lossy());
        }
        p
    }

    /// Stops accepting clients and returns once the listeners are closed
    /// (connections already made stay until their device closes).
    fn stop(self) {
        self.ctx.stop_accepting();
        // Wake the accepting threads: shutdown(2) ends a blocked accept on
        // a TCP listener; a unix listener gets a connection.
        if let Some(l) = &self.tcp_listener {
            // SAFETY: shutdown on a descriptor owned by `l`, alive for the call.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(p) = &self.socket {
            let _ = UnixStream::connect(p);
            let _ = std::fs::remove_file(p);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[derive(Default)]
struct State {
    bases: Vec<BaseBdev>,
    wbs: Vec<WbDev>,
    /// Creates with `wait_for_bdevs` whose base bdevs do not exist yet.
    pending: Vec<CreateRequest>,
    nbd: Vec<NbdServer>,
    shutting_down: bool,
}

impl State {
    fn name_taken(&self, name: &str) -> bool {
        self.bases.iter().any(|b| b.name == name)
            || self.wbs.iter().any(|w| w.req.name == name)
            || self.pending.iter().any(|p| p.name == name)
    }

    fn has_base(&self, name: &str) -> bool {
        self.bases.iter().any(|b| b.name == name)
    }
}

pub struct App {
    opts: AppOpts,
    reactors: Vec<ReactorHandle>,
    next_reactor: AtomicUsize,
    state: Mutex<State>,
    stop_tx: Sender<Stop>,
}

fn exists_error(name: &str) -> RpcError {
    RpcError::new(
        code::EEXIST,
        format!("a bdev named '{name}' already exists; pick another name"),
    )
}

impl App {
    pub fn new(opts: AppOpts, reactors: Vec<ReactorHandle>, stop_tx: Sender<Stop>) -> Self {
        Self {
            opts,
            reactors,
            next_reactor: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            stop_tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one JSON-RPC method.
    pub fn call(&self, method: &str, params: Option<&Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_aio_create" => self.aio_create(params),
            "bdev_malloc_create" => self.malloc_create(params),
            "bdev_aio_delete" => self.base_delete(method, params, "aio"),
            "bdev_malloc_delete" => self.base_delete(method, params, "malloc"),
            "bdev_get_bdevs" => self.get_bdevs(params),
            "bdev_writeboost_create" => self.wb_create(params),
            "bdev_writeboost_delete" => self.wb_delete(params),
            "bdev_writeboost_get_stats" => self.wb_get_stats(params),
            "bdev_writeboost_set_options" => {
                let req = parse_set_options(params)?;
                self.on_device(&req.name.clone(), move |d| {
                    d.set_options(&req).map(|()| Value::Bool(true))
                })
            }
            "bdev_writeboost_drop_caches" => {
                let name = parse_name(method, params)?.name;
                self.on_device(&name, |d| {
                    d.drop_caches();
                    Ok(Value::Bool(true))
                })
            }
            "bdev_writeboost_clear_stats" => {
                let name = parse_name(method, params)?.name;
                self.on_device(&name, |d| {
                    d.clear_stats();
                    Ok(Value::Bool(true))
                })
            }
            "bdev_writeboost_get_quarantine" => {
                let name = parse_name(method, params)?.name;
                self.on_device(&name, |d| Ok(quarantine_json(&d.quarantined())))
            }
            "bdev_writeboost_drop_quarantine" => {
                let req = parse_drop_quarantine(params)?;
                self.on_device(&req.name.clone(), move |d| {
                    drop_quarantine_answer(&req, d.drop_quarantine(req.block))
                })
            }
            "nbd_server_start" => self.nbd_start(params),
            "nbd_server_stop" => self.nbd_stop(params),
            "save_config" => {
                Params::new(method, params, true)?.finish()?;
                Ok(self.save_config())
            }
            // What SPDK's `rpc.py save_config` asks for.
            "framework_get_subsystems" => {
                Params::new(method, params, true)?.finish()?;
                Ok(json!([
                    {"subsystem": "bdev", "depends_on": []},
                    {"subsystem": "nbd", "depends_on": ["bdev"]},
                ]))
            }
            "framework_get_config" => {
                let mut p = Params::new(method, params, false)?;
                let name = p.required_string("name")?;
                let _ = p.boolean("with_batches")?;
                p.finish()?;
                let all = self.save_config();
                all["subsystems"]
                    .as_array()
                    .and_then(|subs| subs.iter().find(|s| s["subsystem"] == name.as_str()))
                    .map(|s| s["config"].clone())
                    .ok_or_else(|| {
                        RpcError::new(
                            code::ENODEV,
                            format!(
                                "{method}: no subsystem named '{name}'; framework_get_subsystems \
                                 lists them"
                            ),
                        )
                    })
            }
            "spdk_get_version" => {
                Params::new(method, params, true)?.finish()?;
                let crate::Build {
                    version: v,
                    git_rev,
                } = self.opts.build;
                let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
                Ok(json!({
                    "version": format!("writeboost v{v} git sha1 {git_rev}"),
                    "fields": {
                        "major": parts.next().unwrap_or(0),
                        "minor": parts.next().unwrap_or(0),
                        "patch": parts.next().unwrap_or(0),
                        "suffix": "",
                    }
                }))
            }
            "rpc_get_methods" => {
                let mut p = Params::new(method, params, true)?;
                let _ = p.boolean("current")?;
                let _ = p.boolean("include_aliases")?;
                p.finish()?;
                let mut all: Vec<&str> = HOST_METHODS.to_vec();
                all.extend(METHODS);
                all.sort_unstable();
                Ok(json!(all))
            }
            "spdk_kill_instance" => self.kill(params),
            // Configuration files written by SPDK end the bdev subsystem with
            // these; the host has nothing to wait for.
            "framework_wait_init" | "bdev_wait_for_examine" => {
                Params::new(method, params, true)?.finish()?;
                Ok(Value::Bool(true))
            }
            _ => Err(RpcError::new(
                code::METHOD_NOT_FOUND,
                format!("Method not found: '{method}'; rpc_get_methods lists the methods served"),
            )),
        }
    }

    fn aio_create(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        let req = bdev::parse_aio(params)?;
        let mut st = self.lock();
        if st.name_taken(&req.name) {
            return Err(exists_error(&req.name));
        }
        let (b, warning) = bdev::create_aio(req, self.opts.direct)?;
        if let Some(w) = warning {
            eprintln!("writeboost: {}: {w}", b.name);
        }
        let name = b.name.clone();
        st.bases.push(b);
        drop(st);
        self.start_waiting();
        Ok(Value::String(name))
    }

    /// Starts the waiting creates whose base bdevs now all exist.
    fn start_waiting(&self) {
        let ready: Vec<CreateRequest> = {
            let mut st = self.lock();
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut st.pending)
                .into_iter()
                .partition(|p| st.has_base(&p.cache_bdev) && st.has_base(&p.backing_bdev));
            st.pending = waiting;
            ready
        };
        for req in ready {
            eprintln!(
                "writeboost: {}: base bdevs {} and {} are present; creating",
                req.name, req.cache_bdev, req.backing_bdev
            );
            if let Err(e) = self.wb_start(req) {
                eprintln!("writeboost: {}", e.message);
            }
        }
    }

    fn malloc_create(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        let mut req = bdev::parse_malloc(params)?;
        let mut st = self.lock();
        let name = match req.name.take() {
            Some(n) if st.name_taken(&n) => return Err(exists_error(&n)),
            Some(n) => n,
            None => (0..)
                .map(|i| format!("Malloc{i}"))
                .find(|n| !st.name_taken(n))
                .unwrap_or_default(),
        };
        let b = bdev::create_malloc(req, name)?;
        let name = b.name.clone();
        st.bases.push(b);
        drop(st);
        self.start_waiting();
        Ok(Value::String(name))
    }

    fn base_delete(
        &self,
        method: &str,
        params: Option<&Value>,
        kind: &str,
    ) -> Result<Value, RpcError> {
        let name = parse_name(method, params)?.name;
        let mut st = self.lock();
        let Some(i) = st.bases.iter().position(|b| {
            b.name == name
                && match b.kind {
                    BaseKind::Aio { .. } => kind == "aio",
                    BaseKind::Malloc => kind == "malloc",
                }
        }) else {
            return Err(RpcError::new(
                code::ENODEV,
                format!("no {kind} bdev named '{name}': bdev_get_bdevs lists the bdevs"),
            ));
        };
        if let Some(owner) = &st.bases[i].claimed_by {
            return Err(RpcError::new(
                code::EBUSY,
                format!(
                    "bdev '{name}' is used by writeboost bdev '{owner}'; delete that first \
                     (bdev_writeboost_delete)"
                ),
            ));
        }
        st.bases.remove(i);
        Ok(Value::Bool(true))
    }

    fn get_bdevs(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        let mut p = Params::new("bdev_get_bdevs", params, true)?;
        let name = p.string("name")?;
        let _ = p.uint("timeout", 0, u32::MAX as u64)?;
        p.finish()?;
        let (mut out, wbs) = {
            let st = self.lock();
            let bases: Vec<Value> = st
                .bases
                .iter()
                .filter(|b| name.as_deref().is_none_or(|n| n == b.name))
                .map(BaseBdev::info)
                .collect();
            let wbs: Vec<(String, usize, u32, u64, [u8; 16])> = st
                .wbs
                .iter()
                .filter(|w| w.state == WbState::Online)
                .filter(|w| name.as_deref().is_none_or(|n| n == w.req.name))
                .map(|w| {
                    (
                        w.req.name.clone(),
                        w.reactor,
                        w.block_size,
                        w.size,
                        w.cache_uuid,
                    )
                })
                .collect();
            (bases, wbs)
        };
        for (wname, reactor, block_size, size, uuid) in wbs {
            let n = wname.clone();
            let report = self.reactors[reactor]
                .call(move |r| r.dev(&n).map(|d| d.report()))
                .flatten();
            if let Some(report) = report {
                out.push(bdev_info(BdevInfo {
                    name: &wname,
                    product_name: "writeboost",
                    block_size,
                    num_blocks: size / block_size as u64,
                    uuid: &uuid,
                    claimed: false,
                    driver_specific: json!({ "writeboost": report }),
                }));
            }
        }
        if let Some(n) = name
            && out.is_empty()
        {
            return Err(RpcError::new(
                code::ENODEV,
                format!("no bdev named '{n}': bdev_get_bdevs without a name lists them"),
            ));
        }
        Ok(Value::Array(out))
    }

    fn wb_create(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        let req = parse_create(params)?;
        if req.wait_for_bdevs {
            let mut st = self.lock();
            if st.name_taken(&req.name) {
                return Err(exists_error(&req.name));
            }
            let missing: Vec<&str> = [&req.cache_bdev, &req.backing_bdev]
                .into_iter()
                .filter(|b| !st.has_base(b))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                eprintln!(
                    "writeboost: {}: waiting for bdev {} to appear",
                    req.name,
                    missing.join(" and ")
                );
                let name = req.name.clone();
                st.pending.push(req);
                return Ok(Value::String(name));
            }
        }
        self.wb_start(req)
    }

    /// The reactor that runs a new device: the one on `core`, or the next
    /// one round robin.
    fn reactor_for(&self, name: &str, core: Option<u32>) -> Result<usize, RpcError> {
        let Some(core) = core else {
            return Ok(self.next_reactor.fetch_add(1, Ordering::Relaxed) % self.reactors.len());
        };
        self.reactors
            .iter()
            .position(|r| r.core == Some(core as usize))
            .ok_or_else(|| {
                let cores: Vec<String> = self
                    .reactors
                    .iter()
                    .filter_map(|r| r.core.map(|c| c.to_string()))
                    .collect();
                RpcError::invalid_params(if cores.is_empty() {
                    format!(
                        "bdev_writeboost_create {name}: core={core}, but no reactor is pinned to a \
                         core; start the host with -m or --cores, or leave core out"
                    )
                } else {
                    format!(
                        "bdev_writeboost_create {name}: core={core} runs no reactor (the host's \
                         cores are {}); pick one of them, or leave core out",
                        cores.join(", ")
                    )
                })
            })
    }

    /// Claims the base bdevs and opens the cache on a reactor.
    fn wb_start(&self, req: CreateRequest) -> Result<Value, RpcError> {
        let name = req.name.clone();
        let m = "bdev_writeboost_create";
        if req.io_core.is_some() {
            return Err(RpcError::invalid_params(format!(
                "{m} {name}: io_core places an SPDK device's base-bdev I/O on a thread of its \
                 own; this host's I/O runs on io_uring or its I/O threads already: leave io_core \
                 out"
            )));
        }
        // (A given core is checked before the bases are looked at: a bad
        // one is the request's fault whatever the bases' state. The round
        // robin moves only for a device that is opened.)
        let pinned = match req.core {
            Some(c) => Some(self.reactor_for(&name, Some(c))?),
            None => None,
        };
        // Check and claim under the lock; open without it.
        let (spec, reactor, desc) = {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(RpcError::new(code::EBUSY, "the host is shutting down"));
            }
            if st.name_taken(&name) {
                return Err(exists_error(&name));
            }
            for (role, b) in [("cache", &req.cache_bdev), ("backing", &req.backing_bdev)] {
                let Some(base) = st.bases.iter().find(|x| &x.name == b) else {
                    let hint = if st.wbs.iter().any(|w| &w.req.name == b) {
                        " (writeboost bdevs cannot be stacked)"
                    } else {
                        ""
                    };
                    return Err(RpcError::new(
                        code::ENODEV,
                        format!(
                            "{m} {name}: no base bdev named '{b}' for the {role}{hint}; create it \
                             first with bdev_aio_create or bdev_malloc_create, or pass \
                             wait_for_bdevs=true to create the device when it appears"
                        ),
                    ));
                };
                if let Some(owner) = &base.claimed_by {
                    return Err(RpcError::new(
                        code::EBUSY,
                        format!(
                            "{m} {name}: {role} bdev '{b}' is already claimed by writeboost bdev \
                             '{owner}'; a base bdev serves one writeboost bdev"
                        ),
                    ));
                }
            }
            let cache = st
                .bases
                .iter()
                .find(|x| x.name == req.cache_bdev)
                .ok_or_else(|| RpcError::new(code::ENODEV, "the cache bdev went away; retry"))?;
            let backing = st
                .bases
                .iter()
                .find(|x| x.name == req.backing_bdev)
                .ok_or_else(|| RpcError::new(code::ENODEV, "the backing bdev went away; retry"))?;
            let new_uuid = store::random_uuid()
                .map_err(|e| RpcError::new(code::EIO, format!("{m} {name}: {e}")))?;
            let geometry = |size, block_size| BaseGeometry { size, block_size };
            let params = req.open_params(
                geometry(cache.size(), cache.block_size),
                geometry(backing.size(), backing.block_size),
                backing.uuid,
                new_uuid,
            );
            let devices = Arc::new(Devices {
                cache: Arc::clone(&cache.file),
                backing: Arc::clone(&backing.file),
            });
            let mode = |d: bool| if d { "O_DIRECT" } else { "buffered" };
            let desc = format!(
                "cache {} ({} bytes, {}), backing {} ({} bytes, {})",
                cache.name,
                cache.size(),
                mode(cache.file.direct),
                backing.name,
                backing.size(),
                mode(backing.file.direct)
            );
            let (size, block_size) = (backing.size(), backing.block_size);
            let reactor = match pinned {
                Some(r) => r,
                None => self.reactor_for(&name, None)?,
            };
            for b in st.bases.iter_mut() {
                if b.name == req.cache_bdev || b.name == req.backing_bdev {
                    b.claimed_by = Some(name.clone());
                }
            }
            let shared = Arc::new(Shared::default());
            st.wbs.push(WbDev {
                req: req.clone(),
                reactor,
                shared: Arc::clone(&shared),
                state: WbState::Opening,
                size,
                block_size,
                cache_uuid: [0; 16],
            });
            (
                DeviceSpec {
                    req: req.clone(),
                    params,
                    devices,
                    shared,
                },
                reactor,
                desc,
            )
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.reactors[reactor].send(move |r| r.open(spec, tx));
        let outcome = rx.recv();
        match outcome {
            Ok(Ok(info)) => {
                let n = name.clone();
                let uuid = self.reactors[reactor]
                    .call(move |r| r.dev(&n).map(|d| d.cache_uuid()))
                    .flatten()
                    .unwrap_or([0; 16]);
                let mut st = self.lock();
                if let Some(w) = st.wbs.iter_mut().find(|w| w.req.name == name) {
                    w.state = WbState::Online;
                    w.cache_uuid = uuid;
                }
                let core = match self.reactors[reactor].core {
                    Some(c) => format!("core {c}"),
                    None => "unpinned".into(),
                };
                let pool = match (&req.pmem_path, info.pmem_is_dax) {
                    (Some(p), Some(true)) => format!(", pmem pool {p} (DAX)"),
                    (Some(p), _) => format!(", pmem pool {p} (not DAX: persists with msync)"),
                    _ => String::new(),
                };
                eprintln!(
                    "writeboost: {name}: mode {}, {desc}{pool}, I/O via {}, reactor {reactor} \
                     ({core})",
                    writeboost_rpc::mode_number(req.mode),
                    info.backend
                );
                Ok(Value::String(name))
            }
            Ok(Err(e)) => {
                self.forget(&name);
                Err(RpcError::new(
                    code::EINVAL,
                    format!(
                        "{m} {name}: {e}; nothing on {} or {} was changed",
                        req.cache_bdev, req.backing_bdev
                    ),
                ))
            }
            Err(_) => {
                self.forget(&name);
                Err(RpcError::new(
                    code::INTERNAL_ERROR,
                    format!("{m} {name}: the reactor thread is gone"),
                ))
            }
        }
    }

    /// Drops a writeboost device from the registry and releases its base bdevs.
    fn forget(&self, name: &str) {
        let mut st = self.lock();
        st.wbs.retain(|w| w.req.name != name);
        for b in st.bases.iter_mut() {
            if b.claimed_by.as_deref() == Some(name) {
                b.claimed_by = None;
            }
        }
    }

    fn wb_delete(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        let name = parse_name("bdev_writeboost_delete", params)?.name;
        let shared = {
            let mut st = self.lock();
            if let Some(i) = st.pending.iter().position(|p| p.name == name) {
                st.pending.remove(i);
                return Ok(Value::Bool(true));
            }
            let Some(w) = st.wbs.iter_mut().find(|w| w.req.name == name) else {
                return Err(RpcError::no_such_device(&name));
            };
            if w.state != WbState::Online {
                return Err(RpcError::new(
                    code::EBUSY,
                    format!("writeboost bdev '{name}' is still opening or already closing; retry"),
                ));
            }
            w.state = WbState::Closing;
            let shared = Arc::clone(&w.shared);
            let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.nbd)
                .into_iter()
                .partition(|s| s.bdev_name == name);
            st.nbd = keep;
            for s in gone {
                s.stop();
            }
            shared
        };
        shared.shut_down();
        self.forget(&name);
        Ok(Value::Bool(true))
    }

    fn wb_get_stats(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        let name = parse_optional_name("bdev_writeboost_get_stats", params)?;
        type Listed = (String, usize, WbState, CreateRequest);
        let (list, pending): (Vec<Listed>, Vec<Value>) = {
            let st = self.lock();
            if let Some(n) = &name
                && !st.wbs.iter().any(|w| &w.req.name == n)
                && !st.pending.iter().any(|p| &p.name == n)
            {
                return Err(RpcError::no_such_device(n));
            }
            let list = st
                .wbs
                .iter()
                .filter(|w| name.as_deref().is_none_or(|n| n == w.req.name))
                .map(|w| (w.req.name.clone(), w.reactor, w.state, w.req.clone()))
                .collect();
            let pending = st
                .pending
                .iter()
                .filter(|p| name.as_deref().is_none_or(|n| n == p.name))
                .map(writeboost_rpc::waiting_report)
                .collect();
            (list, pending)
        };
        let mut out = Vec::new();
        for (n, reactor, state, req) in list {
            let report = if state == WbState::Online {
                let n2 = n.clone();
                self.reactors[reactor]
                    .call(move |r| r.dev(&n2).filter(|d| d.online()).map(|d| d.report()))
                    .flatten()
            } else {
                None
            };
            out.push(report.unwrap_or_else(|| {
                json!({
                    "name": n,
                    "backing_bdev": req.backing_bdev,
                    "cache_bdev": req.cache_bdev,
                    "state": if state == WbState::Opening { "opening" } else { "closing" },
                })
            }));
        }
        out.extend(pending);
        Ok(Value::Array(out))
    }

    /// Runs `f` on a named, online device on its reactor.
    fn on_device(
        &self,
        name: &str,
        f: impl FnOnce(&mut crate::device::Dev) -> Result<Value, RpcError> + Send + 'static,
    ) -> Result<Value, RpcError> {
        let reactor = {
            let st = self.lock();
            let Some(w) = st.wbs.iter().find(|w| w.req.name == name) else {
                return Err(RpcError::no_such_device(name));
            };
            if w.state != WbState::Online {
                return Err(RpcError::new(
                    code::EBUSY,
                    format!(
                        "writeboost bdev '{name}' is not online (it is opening or closing); retry"
                    ),
                ));
            }
            w.reactor
        };
        let n = name.to_string();
        self.reactors[reactor]
            .call(move |r| match r.dev(&n) {
                Some(d) if d.online() => f(d),
                _ => Err(RpcError::new(
                    code::EBUSY,
                    format!("writeboost bdev '{n}' is not online (it is closing); retry"),
                )),
            })
            .unwrap_or_else(|| {
                Err(RpcError::new(
                    code::INTERNAL_ERROR,
                    "the reactor thread is gone",
                ))
            })
    }

    fn nbd_start(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        const M: &str = "nbd_server_start";
        let mut p = Params::new(M, params, false)?;
        let bdev_name = p.required_string("bdev_name")?;
        let listen = p.string("listen")?;
        let socket = p.string("socket")?.map(PathBuf::from);
        p.finish()?;
        if listen.is_none() && socket.is_none() {
            return Err(RpcError::invalid_params(format!(
                "{M}: give 'listen' (a TCP address such as 127.0.0.1:10809) and/or 'socket' (a \
                 unix socket path)"
            )));
        }
        let mut st = self.lock();
        let Some(w) = st.wbs.iter().find(|w| w.req.name == bdev_name) else {
            return Err(RpcError::no_such_device(&bdev_name));
        };
        if w.state != WbState::Online {
            return Err(RpcError::new(
                code::EBUSY,
                format!("writeboost bdev '{bdev_name}' is not online; retry"),
            ));
        }
        if st.nbd.iter().any(|s| s.bdev_name == bdev_name) {
            return Err(RpcError::new(
                code::EEXIST,
                format!(
                    "{M}: '{bdev_name}' is already exported; nbd_server_stop it first to change \
                     its addresses"
                ),
            ));
        }
        let tcp = match &listen {
            Some(a) => {
                let addrs: Vec<SocketAddr> = a
                    .to_socket_addrs()
                    .map_err(|e| {
                        RpcError::invalid_params(format!(
                            "{M}: 'listen' {a:?} is not an address like 127.0.0.1:10809: {e}"
                        ))
                    })?
                    .collect();
                let l = TcpListener::bind(&addrs[..]).map_err(|e| {
                    RpcError::new(
                        code::EBUSY,
                        format!("{M}: cannot listen on {a}: {e}; pick another address"),
                    )
                })?;
                Some(l)
            }
            None => None,
        };
        let unix = match &socket {
            Some(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
                    && UnixStream::connect(path).is_err()
                {
                    // A stale socket from an earlier run.
                    let _ = std::fs::remove_file(path);
                }
                Some(UnixListener::bind(path).map_err(|e| {
                    RpcError::new(
                        code::EBUSY,
                        format!(
                            "{M}: cannot listen on unix socket {}: {e}; check the directory and \
                             that no other server uses it",
                            path.display()
                        ),
                    )
                })?)
            }
            None => None,
        };
        let ctx = Arc::new(ServerCtx::new(
            Arc::clone(&w.shared),
            Export {
                name: bdev_name.clone(),
                description: format!(
                    "writeboost cache of {} on {}",
                    w.req.backing_bdev, w.req.cache_bdev
                ),
                size: w.size,
                flags: TRANSMISSION_FLAGS,
                block_size: w.block_size,
            },
            self.opts.verbose,
        ));
        let mut threads = Vec::new();
        let mut tcp_listener = None;
        let tcp_addr = match tcp {
            Some(l) => {
                let a = l
                    .local_addr()
                    .map_err(|e| RpcError::new(code::EIO, format!("{M}: {e}")))?;
                tcp_listener = Some(
                    l.try_clone()
                        .map_err(|e| RpcError::new(code::EIO, format!("{M}: {e}")))?,
                );
                threads.push(
                    spawn_tcp(l, Arc::clone(&ctx))
                        .map_err(|e| RpcError::new(code::ENOMEM, format!("{M}: {e}")))?,
                );
                Some(a)
            }
            None => None,
        };
        if let Some(l) = unix {
            threads.push(
                spawn_unix(l, Arc::clone(&ctx))
                    .map_err(|e| RpcError::new(code::ENOMEM, format!("{M}: {e}")))?,
            );
        }
        let s = NbdServer {
            bdev_name,
            ctx,
            tcp: tcp_addr,
            tcp_listener,
            socket,
            threads,
        };
        let urls = s.urls();
        st.nbd.push(s);
        Ok(json!(urls.join(" ")))
    }

    fn nbd_stop(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        let mut p = Params::new("nbd_server_stop", params, false)?;
        let name = p.required_string("bdev_name")?;
        p.finish()?;
        let mut st = self.lock();
        let Some(i) = st.nbd.iter().position(|s| s.bdev_name == name) else {
            return Err(RpcError::new(
                code::ENODEV,
                format!("no NBD server exports '{name}'; save_config lists them"),
            ));
        };
        st.nbd.remove(i).stop();
        Ok(Value::Bool(true))
    }

    /// The NBD URLs each export is served on, for the start-up message.
    /// The request queue of writeboost device `name`, once it is online:
    /// what a front end (an NBD connection, a test) submits requests to.
    pub fn device_queue(&self, name: &str) -> Option<Arc<Shared>> {
        self.lock()
            .wbs
            .iter()
            .find(|w| w.req.name == name && w.state == WbState::Online)
            .map(|w| Arc::clone(&w.shared))
    }

    pub fn nbd_summary(&self) -> Vec<(String, u64, Vec<String>)> {
        let st = self.lock();
        st.nbd
            .iter()
            .map(|s| {
                let size = st
                    .wbs
                    .iter()
                    .find(|w| w.req.name == s.bdev_name)
                    .map_or(0, |w| w.size);
                (s.bdev_name.clone(), size, s.urls())
            })
            .collect()
    }

    /// SPDK's configuration shape: replaying it (`--config`) recreates
    /// every bdev and NBD server. `format` is never saved.
    pub fn save_config(&self) -> Value {
        let (bases, wbs, nbd, pending) = {
            let st = self.lock();
            let bases: Vec<Value> = st.bases.iter().map(BaseBdev::config_entry).collect();
            let wbs: Vec<(String, usize, CreateRequest)> = st
                .wbs
                .iter()
                .filter(|w| w.state == WbState::Online)
                .map(|w| (w.req.name.clone(), w.reactor, w.req.clone()))
                .collect();
            let nbd: Vec<Value> = st
                .nbd
                .iter()
                .map(|s| json!({"method": "nbd_server_start", "params": s.params()}))
                .collect();
            let pending: Vec<Value> = st
                .pending
                .iter()
                .map(|p| json!({"method": "bdev_writeboost_create", "params": p.config_params(&p.tunables)}))
                .collect();
            (bases, wbs, nbd, pending)
        };
        let mut bdev = bases;
        for (n, reactor, req) in wbs {
            let params = self.reactors[reactor]
                .call(move |r| r.dev(&n).map(|d| d.config_params()))
                .flatten()
                .unwrap_or_else(|| req.config_params(&req.tunables));
            bdev.push(json!({"method": "bdev_writeboost_create", "params": params}));
        }
        bdev.extend(pending);
        json!({
            "subsystems": [
                {"subsystem": "bdev", "config": bdev},
                {"subsystem": "nbd", "config": nbd},
            ]
        })
    }

    fn kill(&self, params: Option<&Value>) -> Result<Value, RpcError> {
        const M: &str = "spdk_kill_instance";
        let mut p = Params::new(M, params, false)?;
        let sig = p.required_string("sig_name")?;
        p.finish()?;
        match sig.trim_start_matches("SIG") {
            "INT" | "TERM" | "QUIT" | "HUP" => {
                eprintln!("writeboost: {M} {sig}: shutting down cleanly");
                let _ = self.stop_tx.send(Stop::Clean);
                Ok(Value::Bool(true))
            }
            "KILL" => {
                eprintln!("writeboost: {M} {sig}: exiting at once without a clean shutdown");
                std::thread::spawn(|| {
                    // Give the response a moment to leave.
                    std::thread::sleep(Duration::from_millis(50));
                    std::process::exit(137);
                });
                Ok(Value::Bool(true))
            }
            _ => Err(RpcError::invalid_params(format!(
                "{M}: parameter 'sig_name' must be SIGINT, SIGTERM, SIGQUIT, SIGHUP or SIGKILL, got \
                 \"{sig}\""
            ))),
        }
    }

    /// Clean shutdown: stop the NBD servers, close every writeboost device
    /// (requests in flight finish, the open buffer becomes a log, the
    /// superblock record is written), then stop the reactors.
    pub fn shutdown(&self) {
        let shared: Vec<Arc<Shared>> = {
            let mut st = self.lock();
            st.shutting_down = true;
            for s in st.nbd.drain(..) {
                s.stop();
            }
            st.wbs
                .iter_mut()
                .map(|w| {
                    w.state = WbState::Closing;
                    Arc::clone(&w.shared)
                })
                .collect()
        };
        for s in &shared {
            s.stop.store(true, Ordering::Release);
            s.wake();
        }
        for s in &shared {
            s.shut_down();
        }
        for r in &self.reactors {
            r.stop();
        }
    }
}
