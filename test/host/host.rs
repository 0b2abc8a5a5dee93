//! End-to-end tests of the standalone host: the real binary, real files,
//! real NBD clients (qemu-io from qemu-utils, and a raw client here).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::*;

fn write_read(backend: &str) {
    if !have("qemu-io") {
        return;
    }
    let d = tempdir();
    let s = start(&path(&d), &["--io-backend", backend]);
    let uri = s.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 4096 8192",
            "read -P 0xcd 4096 8192",
            "read -P 0xab 0 4096",
            "read -P 0xab 12288 4096",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "discard 2M 64k",
            "write -P 0x11 3M 4M",
            "read -P 0x11 3M 4M",
            "write -P 0x22 255M 1M",
            "read -P 0x22 255M 1M",
            "flush",
        ],
    );
    // Unaligned I/O through qemu's read-modify-write on the advertised 512-byte minimum.
    qemu_io(&uri, &["write -P 0x33 100 1000", "read -P 0x33 100 1000"]);
}

#[test]
fn qemu_io_write_read_uring() {
    write_read("uring");
}

#[test]
fn qemu_io_write_read_threads() {
    write_read("threads");
}

#[test]
fn falls_back_to_threads_without_io_uring() {
    let d = tempdir();
    let mut s = start_env(&path(&d), &[], &[("WRITEBOOST_NO_URING", "1")]);
    let mut c = Client::connect(s.port);
    c.send(NBD_CMD_WRITE, 1, 1, 8192, 4096, &[0x31u8; 4096]);
    assert_eq!(c.reply(|_| 0).1, 0);
    c.send(NBD_CMD_READ, 0, 2, 8192, 4096, &[]);
    let (_, e, data) = c.reply(|_| 4096);
    assert_eq!(e, 0);
    assert!(data.iter().all(|&b| b == 0x31));
    drop(c);
    s.stop();
    let log = s.stderr_after_exit();
    assert!(log.contains("falling back to the thread backend"), "{log}");
    assert!(log.contains("I/O via threads"), "{log}");
}

#[test]
fn sigterm_then_restart_reads_back() {
    if !have("qemu-io") {
        return;
    }
    let d = tempdir();
    let mut s = start(&path(&d), &[]);
    // Not flushed by the client: the clean shutdown must make it durable.
    qemu_io(&s.uri(), &["write -P 0x5a 0 256k", "write -P 0x6b 8M 2M"]);
    s.stop();
    for backend in ["threads", "uring"] {
        let mut s = start(&path(&d), &["--io-backend", backend]);
        qemu_io(
            &s.uri(),
            &[
                "read -P 0x5a 0 256k",
                "read -P 0x6b 8M 2M",
                "read -P 0 16M 64k",
            ],
        );
        s.stop();
    }
}

#[test]
fn kill_9_after_flush_and_fua_keeps_data() {
    if !have("qemu-io") {
        return;
    }
    let d = tempdir();
    let mut s = start(&path(&d), &[]);
    // qemu-io's default cache mode is writethrough (every write is followed by
    // a flush); -t none with an explicit flush covers the FLUSH command too.
    qemu_io(&s.uri(), &["write -P 0x77 0 128k", "write -P 0x78 4M 1M"]);
    let mut c = Client::connect(s.port);
    let data = vec![0x79u8; 8192];
    c.send(NBD_CMD_WRITE, 1 /* FUA */, 1, 64 << 20, 8192, &data);
    assert_eq!(c.reply(|_| 0).1, 0);
    let data = vec![0x7au8; 4096];
    c.send(NBD_CMD_WRITE, 0, 2, 65 << 20, 4096, &data);
    assert_eq!(c.reply(|_| 0).1, 0);
    c.send(NBD_CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(c.reply(|_| 0).1, 0);
    s.crash();
    let s = start(&path(&d), &[]);
    qemu_io(
        &s.uri(),
        &[
            "read -P 0x77 0 128k",
            "read -P 0x78 4M 1M",
            "read -P 0x79 64M 8k",
            "read -P 0x7a 65M 4k",
        ],
    );
}

#[test]
fn other_backing_file_is_refused_and_format_overrides() {
    let d = tempdir();
    let mut s = start(&path(&d), &[]);
    s.stop();
    // A new backing file (new identity) with the old cache.
    std::fs::remove_file(path(&d).join("backing.img")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_writeboost"))
        .arg("--data-dir")
        .arg(path(&d))
        .args(["--nbd-listen", "127.0.0.1:0", "--backing-size", "256M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another backing device"), "{err}");
    let mut s = start(&path(&d), &["--format"]);
    s.stop();
}

#[test]
fn protocol_garbage_and_bad_requests() {
    let d = tempdir();
    let s = start(&path(&d), &[]);

    // Garbage instead of client flags / options: the server closes.
    for garbage in [
        &b"hello there, not nbd"[..],
        &[0xffu8; 64][..],
        &[0, 0, 0, 1][..],
    ] {
        let mut t = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut g = [0u8; 18];
        t.read_exact(&mut g).unwrap();
        t.write_all(garbage).unwrap();
        if garbage.len() == 4 {
            // Valid flags, then an unknown option, then a bad magic.
            let mut o = b"IHAVEOPT".to_vec();
            o.extend_from_slice(&99u32.to_be_bytes());
            o.extend_from_slice(&0u32.to_be_bytes());
            t.write_all(&o).unwrap();
            let mut r = [0u8; 20];
            t.read_exact(&mut r).unwrap();
            assert_eq!(
                u32::from_be_bytes(r[12..16].try_into().unwrap()),
                (1 << 31) + 1
            );
            t.write_all(&[0xee; 16]).unwrap();
        }
        let mut rest = Vec::new();
        let _ = t.read_to_end(&mut rest); // EOF (or reset) rather than a hang
    }

    let mut c = Client::connect(s.port);
    assert_eq!(c.size, 256 << 20);
    let size = c.size;
    // Misaligned, out of range, unknown command, bad flags: error replies.
    c.send(NBD_CMD_READ, 0, 10, 1, 512, &[]);
    assert_eq!(c.reply(|_| 512).1, 22);
    c.send(NBD_CMD_READ, 0, 11, size, 4096, &[]);
    assert_eq!(c.reply(|_| 4096).1, 22);
    c.send(NBD_CMD_WRITE, 0, 12, size - 512, 1024, &[0u8; 1024]);
    assert_eq!(c.reply(|_| 0).1, 28);
    c.send(NBD_CMD_WRITE, 0, 13, 0, 100, &[0u8; 100]);
    assert_eq!(c.reply(|_| 0).1, 22);
    c.send(77, 0, 14, 0, 512, &[]);
    assert_eq!(c.reply(|_| 0).1, 22);
    c.send(NBD_CMD_READ, 0, 15, 0, 64 << 20, &[]);
    assert_eq!(c.reply(|_| 0).1, 22);
    c.send(NBD_CMD_READ, 0x80, 16, 0, 512, &[]);
    assert_eq!(c.reply(|_| 512).1, 22);
    // A trim past the end is EINVAL; FUA on a read is accepted (and means
    // nothing); a rejected FUA write's payload is still consumed.
    c.send(4, 0, 30, size - 512, 1024, &[]);
    assert_eq!(c.reply(|_| 0).1, 22);
    c.send(NBD_CMD_READ, 1, 31, 0, 512, &[]);
    assert_eq!(c.reply(|_| 512).1, 0);
    c.send(NBD_CMD_WRITE, 1, 32, 512, 1000, &[7u8; 1000]);
    assert_eq!(c.reply(|_| 0), (32, 22, Vec::new()));
    // The connection still works.
    c.send(NBD_CMD_WRITE, 0, 17, 4096, 4096, &[9u8; 4096]);
    assert_eq!(c.reply(|_| 0).1, 0);
    c.send(NBD_CMD_READ, 0, 18, 4096, 4096, &[]);
    let (h, e, data) = c.reply(|_| 4096);
    assert_eq!((h, e), (18, 0));
    assert!(data.iter().all(|&b| b == 9));
    // An oversized write closes the connection.
    c.send(NBD_CMD_WRITE, 0, 19, 0, 64 << 20, &[]);
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty());

    // A client vanishing mid-request (header and half a payload).
    let mut c = Client::connect(s.port);
    c.send(NBD_CMD_WRITE, 0, 20, 0, 1 << 20, &vec![1u8; 300 << 10]);
    drop(c);
    // A client vanishing with reads in flight.
    let mut c = Client::connect(s.port);
    for i in 0..32 {
        c.send(NBD_CMD_READ, 0, i, i * (1 << 20), 1 << 20, &[]);
    }
    drop(c);

    // Others are unaffected.
    let mut c = Client::connect(s.port);
    c.send(NBD_CMD_READ, 0, 21, 4096, 4096, &[]);
    let (_, e, data) = c.reply(|_| 4096);
    assert_eq!(e, 0);
    assert!(data.iter().all(|&b| b == 9));
    c.send(NBD_CMD_DISC, 0, 22, 0, 0, &[]);
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

#[test]
fn pipelined_clients_in_parallel() {
    let d = tempdir();
    let mut s = start(&path(&d), &[]);
    let port = s.port;
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            thread::spawn(move || {
                let mut c = Client::connect(port);
                let base = w * (32 << 20);
                let n = 64u64;
                for i in 0..n {
                    let len = 4096 * (1 + (i % 16) as usize);
                    let data = vec![(w * 64 + i) as u8; len];
                    c.send(
                        NBD_CMD_WRITE,
                        0,
                        i,
                        base + i * (128 << 10),
                        len as u32,
                        &data,
                    );
                }
                let mut seen = vec![false; n as usize];
                for _ in 0..n {
                    let (h, e, _) = c.reply(|_| 0);
                    assert_eq!(e, 0);
                    assert!(!seen[h as usize]);
                    seen[h as usize] = true;
                }
                c.send(NBD_CMD_FLUSH, 0, 999, 0, 0, &[]);
                assert_eq!(c.reply(|_| 0), (999, 0, Vec::new()));
                for i in 0..n {
                    let len = 4096 * (1 + (i % 16) as u32);
                    c.send(NBD_CMD_READ, 0, i, base + i * (128 << 10), len, &[]);
                }
                for _ in 0..n {
                    let (h, e, data) = c.reply(|h| 4096 * (1 + (h % 16) as usize));
                    assert_eq!(e, 0);
                    assert!(data.iter().all(|&b| b == (w * 64 + h) as u8), "handle {h}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    s.stop();
}

#[test]
fn unix_socket_and_libnbd_tools() {
    let d = tempdir();
    let sock = d.path().join("wb.sock");
    let mut s = start(&path(&d), &["--nbd-socket", sock.to_str().unwrap()]);
    let unix_uri = format!("nbd+unix:///wb0?socket={}", sock.display());
    if have("qemu-io") {
        qemu_io(&unix_uri, &["write -P 0x42 0 64k", "read -P 0x42 0 64k"]);
    }
    if have("nbdinfo") {
        let out = run_tool(std::process::Command::new("nbdinfo").arg(&unix_uri));
        assert!(out.contains("export-size: 268435456"), "{out}");
        assert!(out.contains("can_multi_conn: true"), "{out}");
        let out = run_tool(
            std::process::Command::new("nbdinfo")
                .arg("--list")
                .arg(s.uri()),
        );
        assert!(out.contains("wb0"), "{out}");
    }
    if have("nbdcopy") {
        // Its own data in over the Unix socket, then all of it out over TCP.
        let src = d.path().join("in.img");
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &pattern).unwrap();
        run_tool(
            std::process::Command::new("nbdcopy")
                .arg(&src)
                .arg(&unix_uri),
        );
        let img = d.path().join("copy.img");
        run_tool(
            std::process::Command::new("nbdcopy")
                .arg(s.uri())
                .arg(&img)
                .arg("--connections=2"),
        );
        let data = std::fs::read(&img).unwrap();
        assert_eq!(data.len(), 256 << 20);
        assert!(
            data[..1 << 20] == pattern[..],
            "nbdcopy read back other data"
        );
    }
    s.stop();
    assert!(!sock.exists(), "socket removed on exit");
}
