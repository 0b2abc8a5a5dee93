//! Stamps the host with the commit it was built from, so that
//! `writeboost --version` and `spdk_get_version` say exactly what runs.

use std::path::Path;
use std::process::Command;

fn main() {
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|r| !r.is_empty())
        // A source tree without git (a release tarball, a vendored copy).
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WRITEBOOST_GIT_REV={rev}");
    // Rebuilt when HEAD moves: a checkout (HEAD) or a commit (the branch's ref).
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(r) = head.strip_prefix("ref: ")
        && Path::new(".git").join(r.trim()).exists()
    {
        println!("cargo:rerun-if-changed=.git/{}", r.trim());
    }
    println!("cargo:rerun-if-changed=.git/packed-refs");
    println!("cargo:rerun-if-changed=build.rs");
}
