//! With the `spdk` feature, compiles the C shim that registers the module and
//! its RPC methods through SPDK's constructor macros, and, for the
//! writeboost_tgt binary, links the SPDK application libraries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "spdk")]
    spdk::build();
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::path::PathBuf;

    pub fn build() {
        // spdk-sys (links = "spdk") exports the include directory it found.
        let include = PathBuf::from(
            std::env::var("DEP_SPDK_INCLUDE")
                .expect("spdk-sys did not report SPDK's include directory"),
        );
        println!("cargo:rerun-if-changed=src/spdk/register.c");
        cc::Build::new()
            .file("src/spdk/register.c")
            .include(&include)
            .flag_if_supported("-Wno-unused-parameter")
            .compile("writeboost_register");
        if let Ok(libs) = std::env::var("DEP_SPDK_APP_LIBS") {
            for l in libs.split_whitespace() {
                println!("cargo:rustc-link-arg-bin=writeboost_tgt={l}");
            }
        }
    }
}
