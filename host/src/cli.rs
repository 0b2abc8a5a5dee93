//! The `writeboost` command line: flags or a configuration file, the
//! embedded default (one device over two files, exported over NBD), the
//! RPC socket, signals and clean shutdown. The root package's binary calls
//! [`main`].
//!
//! ```text
//! writeboost --data-dir /var/lib/wb --cache-size 256M --backing-size 1G
//! qemu-io -f raw nbd://127.0.0.1:10809/wb0 -c 'write -P 0xab 0 1M'
//! writeboost --config wb.yaml --cores 0,1 --rpc-socket /run/wb.sock
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde_json::{Value, json};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use writeboost_engine::Tunables;

use crate::config::Call;
use crate::reactor::{IoBackendKind, ReactorHandle, ReactorOpts};
use crate::registry::{App, AppOpts, Stop};
use crate::{Build, jsonrpc, store};

/// The RPC socket when -r is not given (SPDK's is /var/tmp/spdk.sock; a
/// different default lets both run on one machine).
const DEFAULT_RPC_SOCKET: &str = "/var/tmp/writeboost.sock";

/// Log-structured write-back block cache, served over NBD.
///
/// Without --config: creates DATA_DIR/cache.img and DATA_DIR/backing.img
/// (sparse) if missing, opens (or formats) the cache on them and serves the
/// cached device as an NBD export. With --config: creates the base bdevs,
/// writeboost devices and NBD servers the file describes. Either way the
/// same can be done at runtime over JSON-RPC (--rpc-socket). SIGINT/SIGTERM
/// shut down cleanly; a second signal exits at once.
#[derive(Parser, Debug)]
#[command(name = "writeboost")]
struct Cli {
    /// Configuration file (YAML, or SPDK's JSON as save_config writes it)
    /// describing base bdevs, writeboost devices and NBD servers. Without it
    /// the flags below (--data-dir ... --set) describe one device.
    #[arg(short = 'c', long)]
    config: Option<PathBuf>,
    /// Unix socket for JSON-RPC [default: /var/tmp/writeboost.sock].
    #[arg(short = 'r', long)]
    rpc_socket: Option<PathBuf>,
    /// Cores to run reactors on, as an SPDK core mask: hex (0x3) or a list
    /// ([0,1], [0-3]). One reactor per core, pinned to it.
    #[arg(short = 'm', long, conflicts_with = "cores")]
    cpumask: Option<String>,
    /// Cores to run reactors on, as a list: 0,1 or 0-3. Without -m or
    /// --cores: one unpinned reactor.
    #[arg(long)]
    cores: Option<String>,
    /// Directory holding the device files and the backing identity.
    #[arg(long, default_value = "./writeboost-data", conflicts_with = "config")]
    data_dir: PathBuf,
    /// Size of the cache file when it is created (K/M/G/T suffixes, binary).
    #[arg(long, default_value = "256M", value_parser = store::parse_size, conflicts_with = "config")]
    cache_size: u64,
    /// Size of the backing file when it is created.
    #[arg(long, default_value = "1G", value_parser = store::parse_size, conflicts_with = "config")]
    backing_size: u64,
    /// Use this file or block device as the cache device instead of DATA_DIR/cache.img.
    #[arg(long, conflicts_with = "config")]
    cache_file: Option<PathBuf>,
    /// Use this file or block device as the backing device instead of DATA_DIR/backing.img.
    #[arg(long, conflicts_with = "config")]
    backing_file: Option<PathBuf>,
    /// TCP address to serve NBD on ("off" to disable; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:10809", conflicts_with = "config")]
    nbd_listen: String,
    /// Also serve NBD on this unix socket.
    #[arg(long, conflicts_with = "config")]
    nbd_socket: Option<PathBuf>,
    /// Name of the NBD export.
    #[arg(long, default_value = "wb0", conflicts_with = "config")]
    export_name: String,
    /// Reformat the cache even if it holds a valid one (discards its contents,
    /// including dirty data not yet written back).
    #[arg(long, conflicts_with = "config")]
    format: bool,
    /// Open a cache whose device lost or corrupted logs it had made durable:
    /// keep every intact log, and let the damaged ones' blocks read as their
    /// older contents (without it, such a cache is refused).
    #[arg(long, conflicts_with_all = ["config", "format"])]
    salvage: bool,
    /// How device I/O is done: io_uring (falls back to threads where unavailable) or threads.
    #[arg(long, value_enum, default_value = "uring")]
    io_backend: IoBackendKind,
    /// io_uring queue depth (device commands in flight).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    queue_depth: u32,
    /// Worker threads of the thread backend.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    io_threads: u64,
    /// Do not use O_DIRECT (use the page cache; flushes still fdatasync).
    #[arg(long)]
    no_direct: bool,
    /// Busy-poll this long (µs) after a reactor's last work before sleeping.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Longest sleep (µs) of a reactor while device I/O is in flight; it
    /// bounds the extra latency a new request can see then. With nothing in
    /// flight a reactor sleeps until woken (no CPU use when idle).
    #[arg(long, default_value_t = 200)]
    idle_sleep_us: u64,
    /// Engine tunable NAME=VALUE (repeatable), e.g. writeback_threshold=0.
    #[arg(long = "set", value_name = "NAME=VALUE", conflicts_with = "config")]
    tunables: Vec<String>,
    /// Log connections.
    #[arg(long, short)]
    verbose: bool,
}

fn parse_tunables(list: &[String]) -> Result<Tunables, String> {
    let mut t = Tunables::default();
    for kv in list {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--set {kv}: expected NAME=VALUE"))?;
        let v: u64 = v
            .trim()
            .parse()
            .map_err(|_| format!("--set {kv}: value must be a whole number"))?;
        t.set(k.trim(), v).map_err(|e| format!("--set {kv}: {e}"))?;
    }
    Ok(t)
}

/// Parses a core list: `0,1`, `0-3`, `[0,2-3]`.
fn parse_core_list(s: &str) -> Result<Vec<usize>, String> {
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    let mut cores = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("core list '{s}': '{part}' is not a core number or range like 2-5");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        if a > b || b >= 1024 {
            return Err(bad());
        }
        for c in a..=b {
            if !cores.contains(&c) {
                cores.push(c);
            }
        }
    }
    if cores.is_empty() {
        return Err(format!("core list '{s}' names no core"));
    }
    Ok(cores)
}

/// Parses an SPDK core mask: `0x3`, `3` (hex), or a list in brackets.
fn parse_cpumask(s: &str) -> Result<Vec<usize>, String> {
    let t = s.trim();
    if t.starts_with('[') {
        return parse_core_list(t);
    }
    let hex = t.trim_start_matches("0x").trim_start_matches("0X");
    let mask = u128::from_str_radix(hex, 16)
        .map_err(|_| format!("core mask '{s}' is not hex like 0x3 nor a list like [0,1]"))?;
    let cores: Vec<usize> = (0..128).filter(|i| mask & (1u128 << i) != 0).collect();
    if cores.is_empty() {
        return Err(format!("core mask '{s}' names no core"));
    }
    Ok(cores)
}

/// Runs the host until it is shut down; `build` says what was built.
pub fn main(build: Build) -> ExitCode {
    let version = format!("{} ({})", build.version, build.git_rev);
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli, build) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writeboost: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The embedded default: one writeboost device over two files in the data
/// directory, exported over NBD, as RPC calls.
fn default_config(cli: &Cli, tunables: &Tunables) -> Result<Vec<Call>, String> {
    let p = store::prepare(&store::StoreOptions {
        data_dir: cli.data_dir.clone(),
        cache_file: cli.cache_file.clone(),
        backing_file: cli.backing_file.clone(),
        cache_size: cli.cache_size,
        backing_size: cli.backing_size,
    })
    .map_err(|e| e.to_string())?;
    for n in &p.notes {
        eprintln!("writeboost: {n}");
    }
    if cli.nbd_listen == "off" && cli.nbd_socket.is_none() {
        return Err("nothing to serve on: give --nbd-listen ADDR or --nbd-socket PATH".into());
    }
    let mut wb = json!({
        "name": cli.export_name,
        "backing_bdev": "Backing0",
        "cache_bdev": "Cache0",
    });
    if cli.format {
        wb["format"] = json!(true);
    }
    if cli.salvage {
        wb["salvage"] = json!(true);
    }
    let defaults = Tunables::default().values();
    for ((name, v), (_, d)) in tunables.values().into_iter().zip(defaults) {
        if v != d {
            wb[name] = json!(v);
        }
    }
    let mut nbd = json!({"bdev_name": cli.export_name});
    if cli.nbd_listen != "off" {
        nbd["listen"] = json!(cli.nbd_listen);
    }
    if let Some(s) = &cli.nbd_socket {
        nbd["socket"] = json!(s.to_string_lossy());
    }
    Ok(vec![
        // The cache's own identity is recorded inside it; this UUID only
        // names the bdev.
        Call::new(
            "bdev_aio_create",
            json!({
                "name": "Cache0",
                "filename": p.cache_path.to_string_lossy(),
                "uuid": store::uuid_string(&store::random_uuid().map_err(|e| e.to_string())?),
            }),
        ),
        Call::new(
            "bdev_aio_create",
            json!({
                "name": "Backing0",
                "filename": p.backing_path.to_string_lossy(),
                "uuid": store::uuid_string(&p.backing_uuid),
            }),
        ),
        Call::new("bdev_writeboost_create", wb),
        Call::new("nbd_server_start", nbd),
    ])
}

fn run(cli: Cli, build: Build) -> Result<(), String> {
    let tunables = parse_tunables(&cli.tunables)?;
    let cores: Vec<Option<usize>> = match (&cli.cpumask, &cli.cores) {
        (Some(m), _) => parse_cpumask(m)?.into_iter().map(Some).collect(),
        (None, Some(l)) => parse_core_list(l)?.into_iter().map(Some).collect(),
        (None, None) => vec![None],
    };
    let calls = match &cli.config {
        Some(path) => crate::config::load(path).map_err(|e| e.to_string())?,
        None => default_config(&cli, &tunables)?,
    };

    // Bind the RPC socket first so a clash shows before anything starts.
    let rpc_path = cli
        .rpc_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RPC_SOCKET));
    let rpc = match jsonrpc::bind(&rpc_path) {
        Ok(l) => Some(l),
        // Without -r, a second host on the machine still runs (without RPC).
        Err(e) if cli.rpc_socket.is_none() => {
            eprintln!("writeboost: warning: RPC is off: {e}");
            None
        }
        Err(e) => return Err(e.to_string()),
    };

    let opts = ReactorOpts {
        backend: cli.io_backend,
        queue_depth: cli.queue_depth,
        io_threads: cli.io_threads as usize,
        spin: Duration::from_micros(cli.spin_us),
        idle_sleep: Duration::from_micros(cli.idle_sleep_us.max(1)),
    };
    let mut reactors = Vec::new();
    for (i, core) in cores.iter().enumerate() {
        reactors.push(
            ReactorHandle::spawn(i, *core, opts.clone())
                .map_err(|e| format!("cannot start reactor thread {i}: {e}"))?,
        );
    }
    let (stop_tx, stop_rx) = crossbeam_channel::unbounded::<Stop>();
    let app = Arc::new(App::new(
        AppOpts {
            direct: !cli.no_direct,
            verbose: cli.verbose,
            build,
        },
        reactors,
        stop_tx.clone(),
    ));

    // Signals: the first asks for a clean shutdown, a second exits at once.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    thread::Builder::new()
        .name("wb-signals".into())
        .spawn(move || {
            for (i, sig) in signals.forever().enumerate() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                if i == 0 {
                    eprintln!(
                        "writeboost: {name}: finishing requests in flight and shutting down \
                         cleanly (send it again to exit at once)"
                    );
                    let _ = stop_tx.send(Stop::Clean);
                } else {
                    eprintln!("writeboost: {name} again: exiting without a clean shutdown");
                    std::process::exit(130);
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;

    let rpc_on = rpc.is_some();
    let cleanup = |app: &App| {
        app.shutdown();
        if rpc_on {
            let _ = std::fs::remove_file(&rpc_path);
        }
    };
    for c in &calls {
        let params = match &c.params {
            Value::Null => None,
            p => Some(p),
        };
        if let Err(e) = app.call(&c.method, params) {
            cleanup(&app);
            let source = match &cli.config {
                Some(p) => format!("{}: ", p.display()),
                None => String::new(),
            };
            // Most messages start with the method already.
            let msg = if e.message.starts_with(c.method.as_str()) {
                e.message
            } else {
                format!("{}: {}", c.method, e.message)
            };
            return Err(format!("{source}{msg}"));
        }
    }
    if let Some(l) = rpc {
        jsonrpc::spawn(l, Arc::clone(&app))
            .map_err(|e| format!("cannot start the RPC thread: {e}"))?;
    }
    for (name, size, urls) in app.nbd_summary() {
        println!(
            "writeboost: serving {name} ({size} bytes) on {}",
            urls.join(" and ")
        );
    }
    if rpc_on {
        println!("writeboost: ready; JSON-RPC on {}", rpc_path.display());
    } else {
        println!("writeboost: ready");
    }
    let _ = std::io::stdout().flush();

    let _ = stop_rx.recv();
    cleanup(&app);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists_and_masks() {
        assert_eq!(parse_core_list("0,1").unwrap(), [0, 1]);
        assert_eq!(parse_core_list("[0,2-4]").unwrap(), [0, 2, 3, 4]);
        assert_eq!(parse_core_list("1,1").unwrap(), [1]);
        assert_eq!(parse_cpumask("0x3").unwrap(), [0, 1]);
        assert_eq!(parse_cpumask("c").unwrap(), [2, 3]);
        assert_eq!(parse_cpumask("[1-2]").unwrap(), [1, 2]);
        for bad in ["", "x", "3-1", "0,,a", "99999"] {
            assert!(parse_core_list(bad).is_err(), "{bad}");
        }
        for bad in ["0x0", "0xg", "zz"] {
            assert!(parse_cpumask(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tunables_from_the_command_line() {
        let t = parse_tunables(&["writeback_threshold=5".into()]).unwrap();
        assert_eq!(t.writeback_threshold, 5);
        assert!(parse_tunables(&["writeback_threshold".into()]).is_err());
        assert!(parse_tunables(&["writeback_threshold=x".into()]).is_err());
        assert!(parse_tunables(&["nope=1".into()]).is_err());
    }
}
