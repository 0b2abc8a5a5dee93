//! Links PMDK's libpmem2 (Debian: libpmem2-dev).
fn main() {
    println!("cargo:rustc-link-lib=pmem2");
}
