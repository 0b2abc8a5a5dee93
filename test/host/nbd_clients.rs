//! The NBD export driven by clients nobody here wrote: fio's nbd engine
//! (libnbd) with data verification over several connections at once,
//! qemu-img converting an image onto the export and comparing it back,
//! nbdcopy both ways over several connections, and qemu-io writing with
//! flushes while the host is killed with SIGKILL.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// fio with its nbd engine (Debian builds fio against libnbd).
fn have_fio_nbd() -> bool {
    if !have("fio") {
        return false;
    }
    let out = Command::new("fio").arg("--enghelp").output();
    let ok = out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nbd"));
    if !ok {
        eprintln!("SKIPPED: this fio has no nbd engine");
    }
    ok
}

fn fio(uri: &str, args: &[&str]) -> String {
    let mut c = Command::new("fio");
    c.args([
        "--name=nbd",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--output-format=normal",
        // No verify-state files left in the working directory.
        "--verify_state_save=0",
    ]);
    c.args(args);
    let out = run_tool(&mut c);
    assert!(
        !out.contains("verify:") || !out.contains("bad"),
        "fio reported a verification failure:\n{out}"
    );
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
    out
}

#[test]
fn fio_verifies_random_writes_over_several_connections() {
    if !have_fio_nbd() {
        return;
    }
    let d = tempdir();
    let s = start(&path(&d), &[]);
    let uri = s.uri();
    // Four jobs, four NBD connections, each writing its own 8 MiB region at
    // random with mixed sizes and checking every block it wrote.
    fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--size=8M",
            "--numjobs=4",
            "--offset_increment=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randseed=7",
        ],
    );
    // Then reads and writes mixed, with FLUSH every 16 writes and FUA-free
    // overwrites of what the first pass wrote.
    fio(
        &uri,
        &[
            "--rw=randrw",
            "--bs=4k",
            "--size=16M",
            "--iodepth=8",
            "--fsync=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randseed=8",
        ],
    );
}

#[test]
fn qemu_img_convert_then_compare() {
    if !have("qemu-img") {
        return;
    }
    let d = tempdir();
    let dir = d.path();
    // An image the size of the export, with data, holes and a pattern.
    let src = dir.join("src.img");
    let data = pattern_image(64 << 20, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(&src, &data).unwrap();
    // A 64 MiB backing file, so the export is the image's size.
    let backing = dir.join("backing64.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let s = start(&path(&d), &["--backing-file", backing.to_str().unwrap()]);
    let uri = s.uri();
    convert_then_compare(&src, &uri);
}

/// qemu-img writes the raw image `src` onto the export at `uri`, then
/// compares the two.
fn convert_then_compare(src: &std::path::Path, uri: &str) {
    let src = src.to_str().unwrap();
    run_tool(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", src, uri]));
    let out =
        run_tool(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src, uri]));
    assert!(out.contains("Images are identical"), "{out}");
}

/// Bytes of a deterministic pseudo-random image with holes every fifth 4 KiB.
fn pattern_image(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x = seed;
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 5 == 3 {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    data
}

#[test]
fn nbdcopy_in_and_out_over_several_connections() {
    if !have("nbdcopy") {
        return;
    }
    let d = tempdir();
    let dir = d.path();
    let src = dir.join("in.img");
    let data = pattern_image(32 << 20, 0x2545_f491_4f6c_dd1d);
    std::fs::write(&src, &data).unwrap();
    let backing = dir.join("backing32.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(32 << 20))
        .unwrap();
    let mut s = start(&path(&d), &["--backing-file", backing.to_str().unwrap()]);
    let uri = s.uri();
    // Four connections, eight requests in flight on each.
    run_tool(Command::new("nbdcopy").args([
        "--connections=4",
        "--requests=8",
        "--flush",
        src.to_str().unwrap(),
        &uri,
    ]));
    let out = dir.join("out.img");
    run_tool(Command::new("nbdcopy").args(["--connections=4", &uri, out.to_str().unwrap()]));
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), data.len());
    if let Some(i) = back.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("byte {i} differs after the nbdcopy round trip");
    }
    s.stop();
}

/// What qemu-io printed on stdout, line by line as it ran (line-buffered
/// through stdbuf, so each line arrives when its command completes).
fn spawn_qemu_io(uri: &str, cmds: &[String]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut c = Command::new("stdbuf");
    // Writeback cache (-t none): qemu-io sends FLUSH only when told to.
    c.args(["-oL", "qemu-io", "-f", "raw", "-t", "none", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

#[test]
fn kill_9_while_qemu_io_writes_with_flushes() {
    if !have("qemu-io") || !have("stdbuf") {
        return;
    }
    const SLOTS: u64 = 64;
    const WRITES: usize = 600;
    const SLOT: u64 = 64 << 10;
    let d = tempdir();
    let mut s = start(&path(&d), &[]);
    // Write i puts pattern p(i) in slot i % SLOTS (so slots are overwritten
    // many times), and a FLUSH follows every write.
    let pat = |i: usize| (i % 251 + 1) as u8;
    let slot = |i: usize| i as u64 % SLOTS;
    let mut cmds = Vec::new();
    for i in 0..WRITES {
        cmds.push(format!("write -P {} {} {SLOT}", pat(i), slot(i) * SLOT));
        cmds.push("flush".to_string());
    }
    let (mut qemu, lines) = spawn_qemu_io(&s.uri(), &cmds);
    // Kill the host once 150 writes are acknowledged, while qemu-io goes on.
    let mut acked = 0;
    let end = Instant::now() + TOOL_TIMEOUT;
    while acked < 150 {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.starts_with("wrote ") => acked += 1,
            Ok(_) => {}
            Err(_) => panic!("qemu-io acknowledged only {acked} writes"),
        }
    }
    s.crash();
    // qemu-io fails the remaining commands and exits; count every write it
    // saw acknowledged (a reply can only have come before the kill).
    let end = Instant::now() + TOOL_TIMEOUT;
    while qemu.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "qemu-io did not exit after the kill");
        thread::sleep(Duration::from_millis(20));
    }
    acked += lines.try_iter().filter(|l| l.starts_with("wrote ")).count();
    assert!(acked < WRITES, "the kill came after the last write");
    // qemu-io runs its commands in order: write i+1 was acknowledged only
    // after the FLUSH following write i was, so writes 0..acked-1 are
    // durable. Write acked-1 (acknowledged, flush unknown) and write acked
    // (maybe written, never acknowledged) may or may not have landed: their
    // slots are not checked.
    let durable = acked - 1;
    eprintln!("{acked} writes acknowledged before the kill");
    let unknown = [slot(acked - 1), slot(acked)];
    let mut checks = Vec::new();
    for sl in 0..SLOTS {
        if unknown.contains(&sl) {
            continue;
        }
        // The last durable write to this slot.
        let last = (0..durable)
            .rev()
            .find(|&i| slot(i) == sl)
            .expect("slot written");
        checks.push(format!("read -P {} {} {SLOT}", pat(last), sl * SLOT));
    }
    let checks: Vec<&str> = checks.iter().map(String::as_str).collect();
    let mut s = start(&path(&d), &[]);
    qemu_io(&s.uri(), &checks);
    s.stop();
}

/// A device over base bdevs with 4 KiB blocks. Clients learn the block size
/// in the handshake and align to it (QEMU turns a guest's 1 KiB superblock
/// read into a 4 KiB one, and a 512-byte write into read-modify-write); a
/// client that does not negotiate and sends a misaligned request gets EINVAL.
#[test]
fn four_kib_base_bdevs_serve_clients_that_align() {
    let d = tempdir();
    let dir = d.path();
    for (name, size) in [("cache.img", 64u64 << 20), ("back.img", 64 << 20)] {
        std::fs::File::create(dir.join(name))
            .and_then(|f| f.set_len(size))
            .unwrap();
    }
    let config = dir.join("wb.yaml");
    std::fs::write(
        &config,
        format!(
            "aio:\n  - {{name: Cache0, filename: {d}/cache.img, block_size: 4096}}\n  \
             - {{name: Back0, filename: {d}/back.img, block_size: 4096}}\n\
             writeboost:\n  - {{name: wb0, backing_bdev: Back0, cache_bdev: Cache0}}\n\
             nbd:\n  - {{bdev_name: wb0, listen: \"127.0.0.1:0\"}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let sock = dir.join("rpc.sock");
    let mut h = start_host(&[
        "--config".as_ref(),
        config.as_os_str(),
        "--rpc-socket".as_ref(),
        sock.as_os_str(),
    ]);
    let uri = h.url("wb0");

    // A client that skips negotiation (NBD_OPT_EXPORT_NAME) is held to the
    // block size: misaligned requests fail, aligned ones work.
    let mut c = Client::connect_export(h.port("wb0"), "wb0");
    c.send(NBD_CMD_READ, 0, 1, 1024, 1024, &[]);
    assert_eq!(c.reply(|_| 1024).1, 22, "a 1 KiB read at 1 KiB is EINVAL");
    c.send(NBD_CMD_WRITE, 0, 2, 512, 512, &[7u8; 512]);
    assert_eq!(c.reply(|_| 0).1, 22, "a 512-byte write is EINVAL");
    c.send(NBD_CMD_READ, 0, 3, 8192, 4096, &[]);
    let (_, err, data) = c.reply(|_| 4096);
    assert_eq!((err, data.len()), (0, 4096));
    c.send(NBD_CMD_DISC, 0, 4, 0, 0, &[]);
    drop(c);

    if have("nbdinfo") {
        let out = run_tool(Command::new("nbdinfo").arg(&uri));
        assert!(out.contains("block_size_minimum: 4096"), "{out}");
        assert!(out.contains("block_size_preferred: 4096"), "{out}");
        assert!(out.contains("block_size_maximum: 33554432"), "{out}");
    }
    if have("qemu-io") {
        qemu_io(
            &uri,
            &[
                "write -P 0x5a 0 64k",
                // ext4's superblock read: 1 KiB at 1 KiB.
                "read -P 0x5a 1024 1024",
                "write -P 0x11 512 512",
                "read -P 0x11 512 512",
                "read -P 0x5a 0 512",
                "read -P 0x5a 1024 3072",
                "read -P 0x5a 4096 60k",
            ],
        );
    }
    if have("qemu-img") {
        // An image whose size is not a multiple of 4 KiB: its tail is
        // written by read-modify-write.
        let src = dir.join("src.img");
        let mut data = pattern_image(8 << 20, 0x51_7cc1_b727_220a);
        data.truncate((8 << 20) - 2560);
        std::fs::write(&src, &data).unwrap();
        convert_then_compare(&src, &uri);
    }
    h.server.stop();
}
