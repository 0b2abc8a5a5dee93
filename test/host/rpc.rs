//! The host's JSON-RPC and configuration files, end to end: the real binary,
//! its Unix socket, real files, a pmem pool file, NBD clients, and SPDK's own
//! rpc.py (the `spdk` package from PyPI) with the writeboost plugin.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A sparse file of `size` bytes.
fn file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn start_with_config(config: &Path, sock: &Path, extra: &[&str]) -> Host {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--rpc-socket"),
        sock.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    start_host(&args)
}

/// Everything the host serves over RPC, then `save_config`, a restart from
/// that file, and the data written over NBD before reads back.
#[test]
fn rpc_create_stats_options_delete_save_config_and_restart() {
    if !have("qemu-io") {
        return;
    }
    let d = tempdir();
    let dir = d.path();
    let back0 = file(dir, "back0.img", 64 << 20);
    let back1 = file(dir, "back1.img", 64 << 20);
    let cache1 = file(dir, "cache1.img", 32 << 20);
    let pool = file(dir, "pool.img", 16 << 20);
    let empty = dir.join("empty.yaml");
    std::fs::write(&empty, "# nothing yet\n").unwrap();
    let sock = dir.join("rpc.sock");
    let nbd_sock = dir.join("nbd.sock");
    let mut h = start_with_config(&empty, &sock, &[]);
    let mut rpc = Rpc::connect(&sock);

    // Mode 0 over a malloc cache and a file.
    assert_eq!(
        rpc.ok(
            "bdev_aio_create",
            json!({"name": "Backing0", "filename": s(&back0)})
        ),
        "Backing0"
    );
    assert_eq!(
        rpc.ok(
            "bdev_malloc_create",
            json!({"name": "Cache0", "num_blocks": 8192, "block_size": 4096})
        ),
        "Cache0"
    );
    assert_eq!(
        rpc.ok(
            "bdev_writeboost_create",
            json!({"name": "wb0", "backing_bdev": "Backing0", "cache_bdev": "Cache0",
                   "segment_size_kib": 512})
        ),
        "wb0"
    );
    // Mode 1 over two files and a pmem pool file.
    rpc.ok(
        "bdev_aio_create",
        json!({"name": "Backing1", "filename": s(&back1), "block_size": 4096}),
    );
    rpc.ok(
        "bdev_aio_create",
        json!({"name": "Cache1", "filename": s(&cache1)}),
    );
    assert_eq!(
        rpc.ok(
            "bdev_writeboost_create",
            json!({"name": "wb1", "backing_bdev": "Backing1", "cache_bdev": "Cache1",
                   "mode": 1, "pmem_path": s(&pool), "format": true, "barrier_deadline_ms": 0})
        ),
        "wb1"
    );
    let url = rpc.ok(
        "nbd_server_start",
        json!({"bdev_name": "wb1", "socket": s(&nbd_sock)}),
    );
    let url = url.as_str().unwrap().to_string();
    assert!(url.starts_with("nbd+unix:///wb1?socket="), "{url}");
    qemu_io(
        &url,
        &["write -P 0x5c 0 1M", "write -P 0x7d 4M 64k", "flush"],
    );

    let bdevs = rpc.ok("bdev_get_bdevs", Value::Null);
    let names: Vec<&str> = bdevs
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Backing0", "Cache0", "Backing1", "Cache1", "wb0", "wb1"]
    );
    let wb1 = &rpc.ok("bdev_get_bdevs", json!({"name": "wb1"}))[0];
    assert_eq!(wb1["product_name"], "writeboost");
    assert_eq!(wb1["block_size"], 4096);
    assert_eq!(wb1["num_blocks"], (64 << 20) / 4096);
    assert_eq!(wb1["driver_specific"]["writeboost"]["mode"], 1);
    assert_eq!(
        wb1["uuid"],
        wb1["driver_specific"]["writeboost"]["status"]["cache_uuid"]
    );
    let cache0 = &rpc.ok("bdev_get_bdevs", json!({"name": "Cache0"}))[0];
    assert_eq!(cache0["claimed"], true);
    assert_eq!(cache0["product_name"], "Malloc disk");

    let stats = rpc.ok("bdev_writeboost_get_stats", json!({"name": "wb1"}));
    assert_eq!(stats[0]["state"], "online");
    assert_eq!(stats[0]["pmem_path"], s(&pool));
    assert!(stats[0]["stats"]["user_write_cmds"].as_u64().unwrap() >= 2);
    assert_eq!(
        rpc.ok("bdev_writeboost_get_stats", Value::Null)
            .as_array()
            .unwrap()
            .len(),
        2
    );

    assert_eq!(
        rpc.ok(
            "bdev_writeboost_set_options",
            json!({"name": "wb1", "writeback_threshold": 0, "sync_data_interval": 7})
        ),
        true
    );
    let t = &rpc.ok("bdev_writeboost_get_stats", json!({"name": "wb1"}))[0]["tunables"];
    assert_eq!(
        (
            t["writeback_threshold"].clone(),
            t["sync_data_interval"].clone()
        ),
        (json!(0), json!(7))
    );
    assert_eq!(
        rpc.ok("bdev_writeboost_drop_caches", json!({"name": "wb1"})),
        true
    );
    assert_eq!(
        rpc.ok("bdev_writeboost_clear_stats", json!({"name": "wb1"})),
        true
    );
    let st = &rpc.ok("bdev_writeboost_get_stats", json!({"name": "wb1"}))[0]["stats"];
    assert_eq!(st["user_write_cmds"], 0);
    // Nothing is damaged, so nothing is quarantined, and nothing can be dropped.
    assert_eq!(
        rpc.ok("bdev_writeboost_get_quarantine", json!({"name": "wb1"})),
        json!({"block_size": 4096, "blocks": []})
    );
    let (code, msg) = rpc.err(
        "bdev_writeboost_drop_quarantine",
        json!({"name": "wb1", "block": 7}),
    );
    assert_eq!(code, -2);
    assert!(
        msg.contains("not quarantined") && msg.contains("get_quarantine"),
        "{msg}"
    );
    let (code, msg) = rpc.err("bdev_writeboost_drop_quarantine", json!({"name": "wb1"}));
    assert_eq!(code, -32602);
    assert!(msg.contains("block"), "{msg}");

    // Deleting wb0 releases its base bdevs.
    assert_eq!(
        rpc.ok("bdev_writeboost_delete", json!({"name": "wb0"})),
        true
    );
    assert_eq!(
        rpc.ok("bdev_malloc_delete", json!({"name": "Cache0"})),
        true
    );
    let (code, _) = rpc.err("bdev_writeboost_get_stats", json!({"name": "wb0"}));
    assert_eq!(code, -19);

    // save_config, then a restart from exactly that file.
    let saved = rpc.ok("save_config", Value::Null);
    let bdev_cfg = &saved["subsystems"][0]["config"];
    let methods: Vec<&str> = bdev_cfg
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "bdev_aio_create",
            "bdev_aio_create",
            "bdev_aio_create",
            "bdev_writeboost_create"
        ]
    );
    let wb1_cfg = &bdev_cfg[3]["params"];
    assert_eq!(wb1_cfg["mode"], 1);
    assert_eq!(wb1_cfg["writeback_threshold"], 0);
    assert!(wb1_cfg.get("format").is_none(), "{wb1_cfg}");
    assert_eq!(
        saved["subsystems"][1]["config"][0],
        json!({"method": "nbd_server_start", "params": {"bdev_name": "wb1", "socket": s(&nbd_sock)}})
    );
    let saved_path = dir.join("saved.json");
    std::fs::write(&saved_path, serde_json::to_string_pretty(&saved).unwrap()).unwrap();

    assert_eq!(
        rpc.ok("spdk_kill_instance", json!({"sig_name": "SIGTERM"})),
        true
    );
    let st = h.server.wait(Duration::from_secs(60));
    assert!(st.success(), "{st:?}");
    assert!(!sock.exists(), "RPC socket removed on exit");

    let mut h = start_with_config(&saved_path, &sock, &[]);
    assert_eq!(h.url("wb1"), url);
    qemu_io(&url, &["read -P 0x5c 0 1M", "read -P 0x7d 4M 64k"]);
    let mut rpc = Rpc::connect(&sock);
    let stats = rpc.ok("bdev_writeboost_get_stats", Value::Null);
    assert_eq!(stats.as_array().unwrap().len(), 1);
    assert_eq!(stats[0]["tunables"]["writeback_threshold"], 0);
    h.server.stop();
}

fn assert_serving(rpc: &mut Rpc) {
    let v = rpc.ok("spdk_get_version", Value::Null);
    assert!(v["version"].as_str().unwrap().starts_with("writeboost v"));
}

/// Every kind of bad input gets the right JSON-RPC error, and the host keeps serving.
#[test]
fn rpc_bad_inputs_get_errors_and_the_host_keeps_serving() {
    let d = tempdir();
    let dir = d.path();
    let backa = file(dir, "backa.img", 32 << 20);
    let backb = file(dir, "backb.img", 32 << 20);
    let cache = file(dir, "cache.img", 16 << 20);
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "aio:\n  - {{name: A, filename: {}}}\n  - {{name: C, filename: {}}}\n\
             writeboost:\n  - {{name: wb0, backing_bdev: A, cache_bdev: C}}\n",
            s(&backa),
            s(&cache)
        ),
    )
    .unwrap();
    let sock = dir.join("rpc.sock");
    let mut h = start_with_config(&cfg, &sock, &[]);

    // Malformed JSON: -32700, and that connection ends; others go on.
    let mut bad = Rpc::connect(&sock);
    let v = bad.raw(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\" ]");
    assert_eq!(v["error"]["code"], -32700, "{v}");
    assert_eq!(v["id"], Value::Null);
    let mut rpc = Rpc::connect(&sock);
    assert_serving(&mut rpc);
    let v = rpc.raw(b"[1, 2]");
    assert_eq!(v["error"]["code"], -32600, "{v}");
    let v = rpc.raw(b"{\"jsonrpc\": \"1.0\", \"id\": 3, \"method\": \"spdk_get_version\"}");
    assert_eq!(v["error"]["code"], -32600, "{v}");
    // A notification gets no answer; the next request does.
    rpc.send_only(b"{\"jsonrpc\": \"2.0\", \"method\": \"spdk_get_version\"}");
    assert_serving(&mut rpc);

    let cases: Vec<(&str, Value, i64, &str)> = vec![
        ("no_such_method", Value::Null, -32601, "no_such_method"),
        (
            "bdev_aio_create",
            json!({"name": 7, "filename": "/x"}),
            -32602,
            "'name'",
        ),
        (
            "bdev_aio_create",
            json!({"name": "X", "filename": "/x", "block_size": 1000}),
            -32602,
            "'block_size'",
        ),
        ("bdev_aio_create", json!(["X"]), -32602, "JSON object"),
        (
            "bdev_malloc_create",
            json!({"name": "M", "num_blocks": "8", "block_size": 512}),
            -32602,
            "'num_blocks'",
        ),
        (
            "bdev_writeboost_create",
            json!({"name": "w", "backing_bdev": "A", "cache_bdev": "C", "mode": "1"}),
            -32602,
            "'mode'",
        ),
        (
            "bdev_writeboost_set_options",
            json!({"name": "wb0", "writeback_threshold": -1}),
            -32602,
            "'writeback_threshold'",
        ),
        (
            "bdev_writeboost_get_stats",
            json!({"name": ["wb0"]}),
            -32602,
            "'name'",
        ),
        (
            "nbd_server_start",
            json!({"bdev_name": "wb0", "listen": 10809}),
            -32602,
            "'listen'",
        ),
        (
            "spdk_kill_instance",
            json!({"sig_name": "SIGFOO"}),
            -32602,
            "sig_name",
        ),
        // A missing file.
        (
            "bdev_aio_create",
            json!({"name": "X", "filename": s(&dir.join("missing.img"))}),
            -2,
            "missing.img",
        ),
        // Paths that cannot be written: a directory as a device, a pool, a socket.
        (
            "bdev_aio_create",
            json!({"name": "X", "filename": s(dir)}),
            -5,
            "aio",
        ),
        (
            "nbd_server_start",
            json!({"bdev_name": "wb0", "socket": s(&dir.join("no/such/dir/nbd.sock"))}),
            -16,
            "nbd.sock",
        ),
        // Names in use, claimed bdevs, unknown names.
        (
            "bdev_malloc_create",
            json!({"name": "A", "num_blocks": 8, "block_size": 512}),
            -17,
            "already exists",
        ),
        (
            "bdev_writeboost_create",
            json!({"name": "wb0", "backing_bdev": "A", "cache_bdev": "C"}),
            -17,
            "already exists",
        ),
        (
            "bdev_writeboost_create",
            json!({"name": "wb1", "backing_bdev": "A", "cache_bdev": "Z"}),
            -19,
            "'Z'",
        ),
        (
            "bdev_writeboost_get_stats",
            json!({"name": "nope"}),
            -19,
            "nope",
        ),
        (
            "bdev_writeboost_delete",
            json!({"name": "nope"}),
            -19,
            "nope",
        ),
        (
            "bdev_writeboost_drop_caches",
            json!({"name": "nope"}),
            -19,
            "nope",
        ),
        (
            "bdev_writeboost_clear_stats",
            json!({"name": "nope"}),
            -19,
            "nope",
        ),
        (
            "bdev_writeboost_get_quarantine",
            json!({"name": "nope"}),
            -19,
            "nope",
        ),
        ("bdev_get_bdevs", json!({"name": "nope"}), -19, "nope"),
        ("bdev_aio_delete", json!({"name": "nope"}), -19, "nope"),
        ("bdev_malloc_delete", json!({"name": "A"}), -19, "malloc"),
        ("bdev_aio_delete", json!({"name": "A"}), -16, "wb0"),
        ("nbd_server_stop", json!({"bdev_name": "wb0"}), -19, "wb0"),
    ];
    for (method, params, code, needle) in cases {
        let (c, msg) = rpc.err(method, params.clone());
        assert_eq!(c, code, "{method} {params}: {msg}");
        assert!(msg.contains(needle), "{method} {params}: {msg}");
        assert_serving(&mut rpc);
    }

    // A base bdev already claimed.
    rpc.ok(
        "bdev_aio_create",
        json!({"name": "B", "filename": s(&backb)}),
    );
    let (c, msg) = rpc.err(
        "bdev_writeboost_create",
        json!({"name": "wb1", "backing_bdev": "B", "cache_bdev": "C"}),
    );
    assert_eq!(c, -16, "{msg}");
    assert!(
        msg.contains("already claimed by writeboost bdev 'wb0'"),
        "{msg}"
    );

    // A pmem pool that is a directory.
    rpc.ok(
        "bdev_malloc_create",
        json!({"name": "M", "num_blocks": 4096, "block_size": 4096}),
    );
    let (c, msg) = rpc.err(
        "bdev_writeboost_create",
        json!({"name": "wb1", "backing_bdev": "B", "cache_bdev": "M", "mode": 1, "pmem_path": s(dir)}),
    );
    assert_eq!(c, -22, "{msg}");
    assert!(msg.contains("pmem"), "{msg}");
    // The failed create released its base bdevs.
    assert_eq!(
        rpc.ok("bdev_get_bdevs", json!({"name": "M"}))[0]["claimed"],
        false
    );

    // The cache of another backing device is refused, and nothing is claimed after.
    rpc.ok("bdev_writeboost_delete", json!({"name": "wb0"}));
    assert_eq!(
        rpc.ok("bdev_get_bdevs", json!({"name": "B"}))[0]["claimed"],
        false
    );
    let (c, msg) = rpc.err(
        "bdev_writeboost_create",
        json!({"name": "wb0", "backing_bdev": "B", "cache_bdev": "C"}),
    );
    assert_eq!(c, -22, "{msg}");
    assert!(msg.contains("another backing device"), "{msg}");
    assert_eq!(
        rpc.ok("bdev_get_bdevs", json!({"name": "C"}))[0]["claimed"],
        false
    );
    // The right backing device still opens it.
    rpc.ok(
        "bdev_writeboost_create",
        json!({"name": "wb0", "backing_bdev": "A", "cache_bdev": "C"}),
    );

    // wait_for_bdevs: created once both base bdevs exist (saved configurations set it).
    let req =
        json!({"name": "wb3", "backing_bdev": "L1", "cache_bdev": "L2", "wait_for_bdevs": true});
    assert_eq!(rpc.ok("bdev_writeboost_create", req), "wb3");
    let st = rpc.ok("bdev_writeboost_get_stats", json!({"name": "wb3"}));
    assert_eq!(st[0]["state"], "waiting_for_base_bdevs");
    for n in ["L1", "L2"] {
        rpc.ok(
            "bdev_malloc_create",
            json!({"name": n, "num_blocks": 4096, "block_size": 4096}),
        );
    }
    let st = rpc.ok("bdev_writeboost_get_stats", json!({"name": "wb3"}));
    assert_eq!(st[0]["state"], "online");
    assert_eq!(
        rpc.ok("bdev_writeboost_delete", json!({"name": "wb3"})),
        true
    );
    assert_serving(&mut Rpc::connect(&sock));
    h.server.stop();
}

/// A YAML configuration with two writeboost devices on two reactors, each
/// served over NBD; the idle host then uses (almost) no CPU.
#[test]
fn yaml_config_two_devices_on_two_reactors() {
    let d = tempdir();
    let dir = d.path();
    let b0 = file(dir, "b0.img", 32 << 20);
    let b1 = file(dir, "b1.img", 32 << 20);
    let cfg = dir.join("wb.yaml");
    std::fs::write(
        &cfg,
        format!(
            "# two caches in RAM over two files\n\
             aio:\n\
             \x20 - name: B0\n    filename: {}\n\
             \x20 - name: B1\n    filename: {}\n    block_size: 4096\n\
             malloc:\n\
             \x20 - {{name: C0, num_blocks: 4096, block_size: 4096}}\n\
             \x20 - {{name: C1, num_blocks: 32768, block_size: 512}}\n\
             writeboost:\n\
             \x20 - {{name: wb0, backing_bdev: B0, cache_bdev: C0, writeback_threshold: 0, core: 1}}\n\
             \x20 - {{name: wb1, backing_bdev: B1, cache_bdev: C1, segment_size_kib: 256}}\n\
             nbd:\n\
             \x20 - {{bdev_name: wb0, listen: \"127.0.0.1:0\"}}\n\
             \x20 - {{bdev_name: wb1, listen: \"127.0.0.1:0\"}}\n",
            s(&b0),
            s(&b1)
        ),
    )
    .unwrap();
    let sock = dir.join("rpc.sock");
    let mut h = start_with_config(&cfg, &sock, &["--cores", "0,1"]);
    for (name, fill) in [("wb0", 0xa0u8), ("wb1", 0xb1u8)] {
        let mut c = Client::connect_export(h.port(name), name);
        assert_eq!(c.size, 32 << 20);
        c.send(NBD_CMD_WRITE, 1, 1, 65536, 4096, &[fill; 4096]);
        assert_eq!(c.reply(|_| 0).1, 0);
        c.send(NBD_CMD_READ, 0, 2, 65536, 4096, &[]);
        let (_, e, data) = c.reply(|_| 4096);
        assert_eq!(e, 0);
        assert!(data.iter().all(|&b| b == fill), "{name}");
        c.send(NBD_CMD_DISC, 0, 3, 0, 0, &[]);
    }
    let mut rpc = Rpc::connect(&sock);
    let stats = rpc.ok("bdev_writeboost_get_stats", Value::Null);
    assert_eq!(stats[0]["tunables"]["writeback_threshold"], 0);
    assert_eq!(stats[1]["status"]["segment_size"], 256 << 10);
    // A core no reactor runs on is refused, saying which cores there are;
    // save_config keeps the core a device was given.
    let (_, msg) = rpc.err(
        "bdev_writeboost_create",
        json!({"name": "wb9", "backing_bdev": "B1", "cache_bdev": "C1", "core": 7}),
    );
    assert!(msg.contains("core=7") && msg.contains("0, 1"), "{msg}");
    let saved = rpc.ok("save_config", Value::Null);
    let creates: Vec<&Value> = saved["subsystems"][0]["config"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "bdev_writeboost_create")
        .collect();
    assert_eq!(creates[0]["params"]["core"], 1, "{creates:?}");
    assert!(creates[1]["params"].get("core").is_none(), "{creates:?}");

    // nbd_server_stop: no new clients; the device itself stays.
    let port0 = h.port("wb0");
    assert_eq!(rpc.ok("nbd_server_stop", json!({"bdev_name": "wb0"})), true);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port0)).is_err());
    let url = rpc.ok(
        "nbd_server_start",
        json!({"bdev_name": "wb0", "listen": "127.0.0.1:0"}),
    );
    let port0: u16 = url
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut c = Client::connect_export(port0, "wb0");
    c.send(NBD_CMD_READ, 0, 4, 65536, 4096, &[]);
    let (_, e, data) = c.reply(|_| 4096);
    assert_eq!(e, 0);
    assert!(data.iter().all(|&b| b == 0xa0));
    // Deleting an exported device: its open connection gets ESHUTDOWN, its
    // listener goes away.
    assert_eq!(
        rpc.ok("bdev_writeboost_delete", json!({"name": "wb0"})),
        true
    );
    c.send(NBD_CMD_READ, 0, 5, 65536, 4096, &[]);
    assert_eq!(c.reply(|_| 4096).1, 108);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port0)).is_err());
    assert_eq!(
        rpc.ok("bdev_writeboost_get_stats", Value::Null)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let log: Vec<String> = h.server.stderr.try_iter().collect();
    let log = log.join("\n");
    // wb0 on the core it was given; wb1 round robin, from the first.
    let line = |name: &str| {
        log.lines()
            .find(|l| l.contains(&format!("{name}: mode 0")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("wb0").contains("reactor 1 (core 1)"), "{log}");
    assert!(line("wb1").contains("reactor 0 (core 0)"), "{log}");

    // Idle: two reactors, two devices, nothing to do.
    std::thread::sleep(Duration::from_millis(500));
    let pid = h.server.child.as_ref().unwrap().id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // Clock ticks are 1/100 s: under 10 % of one core over 2 s.
    assert!(used < 20, "idle host used {used} ticks of CPU in 2 s");
    h.server.stop();
    let log = h.server.stderr_after_exit();
    assert!(log.contains("wb1: clean shutdown"), "{log}");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// True if SPDK's rpc.py (the `spdk` package) can be run with python3.
fn have_spdk_rpc() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import spdk.spdk_rpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install SPDK's rpc.py (pip install spdk)"
        );
        eprintln!("SKIPPED: SPDK's rpc.py is not installed (pip install spdk)");
    }
    ok
}

/// Runs SPDK's rpc.py with the writeboost plugin; returns (success, output).
fn spdk_rpc(sock: &Path, args: &[&str]) -> (bool, String) {
    let plugin_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rpc");
    let out = Command::new("python3")
        .env("PYTHONPATH", &plugin_dir)
        .args(["-m", "spdk.spdk_rpc", "-s"])
        .arg(sock)
        .args(["--plugin", "writeboost_rpc"])
        .args(args)
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn spdk_rpc_ok(sock: &Path, args: &[&str]) -> String {
    let (ok, text) = spdk_rpc(sock, args);
    assert!(ok, "rpc.py {args:?} failed:\n{text}");
    text
}

/// SPDK's own rpc.py drives the host, unchanged.
#[test]
fn spdk_rpc_py_drives_the_host() {
    if !have_spdk_rpc() {
        return;
    }
    let d = tempdir();
    let dir = d.path();
    let back = file(dir, "back.img", 64 << 20);
    let empty = dir.join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let sock = dir.join("rpc.sock");
    let mut h = start_with_config(&empty, &sock, &[]);
    let r = |args: &[&str]| spdk_rpc_ok(&sock, args);

    assert!(r(&["spdk_get_version"]).contains("writeboost v"));
    assert!(r(&["rpc_get_methods"]).contains("bdev_writeboost_create"));
    assert!(r(&["bdev_malloc_create", "-b", "Cache0", "16", "4096"]).contains("Cache0"));
    assert!(r(&["bdev_aio_create", &s(&back), "Backing0", "512"]).contains("Backing0"));
    assert!(
        r(&[
            "bdev_writeboost_create",
            "-n",
            "wb0",
            "-b",
            "Backing0",
            "-c",
            "Cache0",
            "--writeback-threshold",
            "20",
        ])
        .contains("wb0")
    );
    let stats: Value =
        serde_json::from_str(&r(&["bdev_writeboost_get_stats", "-n", "wb0"])).unwrap();
    assert_eq!(stats[0]["tunables"]["writeback_threshold"], 20);
    r(&[
        "bdev_writeboost_set_options",
        "wb0",
        "--writeback-threshold",
        "0",
    ]);
    r(&["bdev_writeboost_drop_caches", "wb0"]);
    r(&["bdev_writeboost_clear_stats", "wb0"]);
    assert!(r(&["bdev_writeboost_get_quarantine", "wb0"]).contains("\"blocks\": []"));
    // The plugin also carries the host's NBD export methods.
    let nbd_sock = dir.join("wb0.nbd");
    assert!(r(&["nbd_server_start", "wb0", "--socket", &s(&nbd_sock)]).contains("nbd+unix"));
    assert!(nbd_sock.exists());
    r(&["nbd_server_stop", "wb0"]);
    let bdevs: Value = serde_json::from_str(&r(&["bdev_get_bdevs", "-b", "wb0"])).unwrap();
    assert_eq!(
        bdevs[0]["driver_specific"]["writeboost"]["tunables"]["writeback_threshold"],
        0
    );
    // rpc.py's save_config asks for each subsystem's configuration.
    let saved: Value = serde_json::from_str(&r(&["save_config"])).unwrap();
    let bdev = &saved["subsystems"][0];
    assert_eq!(bdev["subsystem"], "bdev");
    assert_eq!(bdev["config"][2]["method"], "bdev_writeboost_create");
    assert_eq!(bdev["config"][2]["params"]["writeback_threshold"], 0);

    // Refusals come back as rpc.py errors with SPDK's codes.
    let (ok, text) = spdk_rpc(&sock, &["bdev_writeboost_delete", "nope"]);
    assert!(!ok && text.contains("-19"), "{text}");
    let (ok, text) = spdk_rpc(&sock, &["bdev_malloc_delete", "Cache0"]);
    assert!(!ok && text.contains("-16"), "{text}");

    // Without -b the bdev gets SPDK's kind of name.
    assert_eq!(r(&["bdev_malloc_create", "1", "512"]).trim(), "Malloc0");
    r(&["bdev_malloc_delete", "Malloc0"]);
    r(&["bdev_writeboost_delete", "wb0"]);
    r(&["bdev_malloc_delete", "Cache0"]);
    r(&["bdev_aio_delete", "Backing0"]);
    assert_eq!(r(&["bdev_get_bdevs"]).trim(), "[]");
    r(&["spdk_kill_instance", "SIGINT"]);
    let st = h.server.wait(Duration::from_secs(60));
    assert!(st.success(), "{st:?}");
}

/// Requests split across writes and several in one write are all answered,
/// in order; a reactor that cannot be pinned warns and runs.
#[test]
fn rpc_framing_and_unpinnable_core() {
    let d = tempdir();
    let dir = d.path();
    let empty = dir.join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let sock = dir.join("rpc.sock");
    let mut h = start_with_config(&empty, &sock, &["--cores", "1000"]);
    let mut rpc = Rpc::connect(&sock);
    rpc.send_only(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"meth");
    std::thread::sleep(Duration::from_millis(100));
    let v = rpc.raw(b"od\": \"spdk_get_version\"}\n{\"jsonrpc\": \"2.0\", \"id\": 2, \"method\": \"rpc_get_methods\"}");
    assert_eq!(v["id"], 1, "{v}");
    assert!(v["result"]["version"].is_string(), "{v}");
    let v = rpc.raw(b"");
    assert_eq!(v["id"], 2, "{v}");
    assert!(
        v["result"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "bdev_writeboost_get_stats"),
        "{v}"
    );
    // The reactor is unpinned but works.
    rpc.ok(
        "bdev_malloc_create",
        json!({"name": "C", "num_blocks": 4096, "block_size": 4096}),
    );
    rpc.ok(
        "bdev_malloc_create",
        json!({"name": "B", "num_blocks": 16384, "block_size": 4096}),
    );
    rpc.ok(
        "bdev_writeboost_create",
        json!({"name": "wb0", "backing_bdev": "B", "cache_bdev": "C"}),
    );
    h.server.stop();
    let log = h.server.stderr_after_exit();
    assert!(log.contains("cannot pin reactor 0 to core 1000"), "{log}");
    assert!(log.contains("wb0: clean shutdown"), "{log}");
}
