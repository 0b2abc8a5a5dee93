//! With the `spdk` feature, links the SPDK application libraries that
//! spdk-sys found into the tool.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(libs) = std::env::var("DEP_SPDK_APP_LIBS") {
        for l in libs.split_whitespace() {
            println!("cargo:rustc-link-arg-bin=wb_ack_check={l}");
        }
    }
}
