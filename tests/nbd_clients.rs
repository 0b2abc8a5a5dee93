//! The NBD export driven by clients nobody here wrote: fio's nbd engine
//! (libnbd) with data verification over several connections at once, and
//! qemu-img converting an image onto the export and comparing it back.

mod common;

use std::process::Command;

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
    let mut data = vec![0u8; 64 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 5 == 3 {
            continue; // a hole
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(&src, &data).unwrap();
    // A 64 MiB backing file, so the export is the image's size.
    let backing = dir.join("backing64.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let s = start(&path(&d), &["--backing-file", backing.to_str().unwrap()]);
    let uri = s.uri();
    run_tool(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &uri,
    ]));
    let out = run_tool(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &uri,
    ]));
    assert!(out.contains("Images are identical"), "{out}");
}
