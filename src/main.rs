//! `writeboost`: the standalone host. Runs a writeboost cache over two files
//! (or block devices) and serves it over NBD.
//!
//! ```text
//! writeboost --data-dir /var/lib/wb --cache-size 256M --backing-size 1G
//! qemu-io -f raw nbd://127.0.0.1:10809/wb0 -c 'write -P 0xab 0 1M'
//! ```

mod alloc;
mod device;
mod nbd;
mod reactor;
mod store;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use writeboost_engine::{BackingIdentity, OpenParams, Tunables};

use nbd::proto::{Export, TRANSMISSION_FLAGS};
use nbd::server::{ServerCtx, spawn_tcp, spawn_unix};
use reactor::{IoBackendKind, ReactorConfig, Shared};

/// Log-structured write-back block cache, served over NBD.
///
/// Creates DATA_DIR/cache.img and DATA_DIR/backing.img (sparse) if missing,
/// opens (or formats) the cache on them and serves the cached device as an
/// NBD export. SIGINT/SIGTERM shut down cleanly; a second signal exits at once.
#[derive(Parser, Debug)]
#[command(name = "writeboost", version)]
struct Cli {
    /// Directory holding the device files and the backing identity.
    #[arg(long, default_value = "./writeboost-data")]
    data_dir: PathBuf,
    /// Size of the cache file when it is created (K/M/G/T suffixes, binary).
    #[arg(long, default_value = "256M", value_parser = store::parse_size)]
    cache_size: u64,
    /// Size of the backing file when it is created.
    #[arg(long, default_value = "1G", value_parser = store::parse_size)]
    backing_size: u64,
    /// Use this file or block device as the cache device instead of DATA_DIR/cache.img.
    #[arg(long)]
    cache_file: Option<PathBuf>,
    /// Use this file or block device as the backing device instead of DATA_DIR/backing.img.
    #[arg(long)]
    backing_file: Option<PathBuf>,
    /// TCP address to serve NBD on ("off" to disable; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// Also serve NBD on this unix socket.
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Name of the NBD export.
    #[arg(long, default_value = "wb0")]
    export_name: String,
    /// Reformat the cache even if it holds a valid one (discards its contents,
    /// including dirty data not yet written back).
    #[arg(long)]
    format: bool,
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
    /// Busy-poll this long (µs) after the last work before sleeping.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Longest sleep (µs) of the reactor while device I/O is in flight; it
    /// bounds the extra latency a new request can see then. With nothing in
    /// flight the reactor sleeps until woken (no CPU use when idle).
    #[arg(long, default_value_t = 200)]
    idle_sleep_us: u64,
    /// Engine tunable NAME=VALUE (repeatable), e.g. writeback_threshold=0.
    #[arg(long = "set", value_name = "NAME=VALUE")]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writeboost: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let tunables = parse_tunables(&cli.tunables)?;
    let st = store::open(&store::StoreOptions {
        data_dir: cli.data_dir.clone(),
        cache_file: cli.cache_file.clone(),
        backing_file: cli.backing_file.clone(),
        cache_size: cli.cache_size,
        backing_size: cli.backing_size,
        direct: !cli.no_direct,
    })
    .map_err(|e| e.to_string())?;
    for n in &st.notes {
        eprintln!("writeboost: {n}");
    }

    // Bind before opening the cache so a busy port fails fast.
    let tcp = if cli.nbd_listen != "off" {
        let l = TcpListener::bind(&cli.nbd_listen).map_err(|e| {
            format!(
                "cannot listen on {}: {e}; pick another --nbd-listen address",
                cli.nbd_listen
            )
        })?;
        Some(l)
    } else {
        None
    };
    let unix = match &cli.nbd_socket {
        Some(p) => {
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                // A stale socket from a previous run (nobody else can serve
                // these files while we hold their lock).
                let _ = std::fs::remove_file(p);
            }
            Some(
                UnixListener::bind(p)
                    .map_err(|e| format!("cannot listen on unix socket {}: {e}", p.display()))?,
            )
        }
        None => None,
    };
    if tcp.is_none() && unix.is_none() {
        return Err("nothing to serve on: give --nbd-listen ADDR or --nbd-socket PATH".into());
    }

    let mut params = OpenParams::new(
        st.cache_size,
        BackingIdentity {
            uuid: st.backing_uuid,
            size: st.backing_size,
        },
        store::random_uuid().map_err(|e| e.to_string())?,
    );
    params.format = cli.format;
    params.tunables = tunables;
    let ctx_direct = (st.devices.cache.direct, st.devices.backing.direct);
    let devices = Arc::new(st.devices);
    let shared = Arc::new(Shared::default());

    // Signals: the first asks for a clean shutdown, a second exits at once.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    {
        let shared = Arc::clone(&shared);
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
                        shared.stop.store(true, Ordering::Release);
                        shared.wake();
                    } else {
                        eprintln!("writeboost: {name} again: exiting without a clean shutdown");
                        std::process::exit(130);
                    }
                }
            })
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    }

    let cfg = ReactorConfig {
        params,
        devices,
        backend: cli.io_backend,
        queue_depth: cli.queue_depth,
        io_threads: cli.io_threads as usize,
        spin: Duration::from_micros(cli.spin_us),
        idle_sleep: Duration::from_micros(cli.idle_sleep_us.max(1)),
    };
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let rshared = Arc::clone(&shared);
    let reactor = thread::Builder::new()
        .name("wb-reactor".into())
        .spawn(move || {
            reactor::run(cfg, rshared, move |r| {
                let _ = ready_tx.send(r);
            })
        })
        .map_err(|e| format!("cannot start the reactor thread: {e}"))?;
    let info = match ready_rx.recv() {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            let _ = reactor.join();
            return Err(e.to_string());
        }
        Err(_) => return Err("the reactor thread died during start-up".into()),
    };

    let ctx = Arc::new(ServerCtx {
        shared: Arc::clone(&shared),
        export: Export {
            name: cli.export_name.clone(),
            description: format!("writeboost cache over {}", st.backing_path.display()),
            size: st.backing_size,
            flags: TRANSMISSION_FLAGS,
        },
        verbose: cli.verbose,
    });
    let mut urls = Vec::new();
    if let Some(l) = tcp {
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        urls.push(format!("nbd://{addr}/{}", cli.export_name));
        spawn_tcp(l, Arc::clone(&ctx)).map_err(|e| e.to_string())?;
    }
    if let Some(l) = unix {
        if let Some(p) = &cli.nbd_socket {
            urls.push(format!(
                "nbd+unix:///{}?socket={}",
                cli.export_name,
                p.display()
            ));
        }
        spawn_unix(l, Arc::clone(&ctx)).map_err(|e| e.to_string())?;
    }
    let mode = |direct: bool| if direct { "O_DIRECT" } else { "buffered" };
    eprintln!(
        "writeboost: cache {} ({} bytes, {}), backing {} ({} bytes, {}), I/O via {}",
        st.cache_path.display(),
        st.cache_size,
        mode(ctx_direct.0),
        st.backing_path.display(),
        st.backing_size,
        mode(ctx_direct.1),
        info.backend
    );
    println!(
        "writeboost: serving {} ({} bytes) on {}",
        cli.export_name,
        st.backing_size,
        urls.join(" and ")
    );
    let _ = std::io::stdout().flush();

    let clean = reactor.join().is_ok();
    if let Some(p) = &cli.nbd_socket {
        let _ = std::fs::remove_file(p);
    }
    if clean {
        Ok(())
    } else {
        Err("the reactor thread panicked; the cache recovers from its log at the next start".into())
    }
}
