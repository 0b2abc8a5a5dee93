//! Finds SPDK and generates bindings for the parts the bdev module uses.
//! Without the `spdk` feature nothing is generated, so the workspace builds
//! on machines without SPDK.

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    #[cfg(feature = "spdk")]
    spdk::generate();
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::path::PathBuf;
    use std::process::Command;

    /// Include directory and linker arguments of an installed SPDK.
    fn locate() -> (PathBuf, Vec<String>) {
        if let Ok(dir) = std::env::var("SPDK_DIR") {
            let dir = PathBuf::from(dir);
            let include = [dir.join("include"), dir.join("build/include")]
                .into_iter()
                .find(|p| p.join("spdk/bdev_module.h").exists())
                .unwrap_or_else(|| {
                    panic!(
                        "SPDK_DIR={} has no include/spdk/bdev_module.h",
                        dir.display()
                    )
                });
            let lib = [dir.join("lib"), dir.join("build/lib")]
                .into_iter()
                .find(|p| p.exists());
            let libs = lib
                .map(|l| vec![format!("-L{}", l.display())])
                .unwrap_or_default();
            return (include, libs);
        }
        let out = Command::new("pkg-config")
            .args(["--cflags-only-I", "--libs", "spdk_bdev", "spdk_event", "spdk_env_dpdk"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .unwrap_or_else(|| {
                panic!("SPDK not found: set SPDK_DIR to an SPDK install (or source tree), or make `pkg-config spdk_bdev` work")
            });
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let include = text
            .split_whitespace()
            .find_map(|t| t.strip_prefix("-I"))
            .map(PathBuf::from)
            .expect("pkg-config gave no include directory for spdk_bdev");
        let libs = text
            .split_whitespace()
            .filter(|t| !t.starts_with("-I"))
            .map(str::to_string)
            .collect();
        (include, libs)
    }

    pub fn generate() {
        let (include, libs) = locate();
        for l in libs {
            if let Some(dir) = l.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={dir}");
            } else if let Some(name) = l.strip_prefix("-l") {
                println!("cargo:rustc-link-lib={name}");
            }
        }
        println!("cargo:include={}", include.display());
        println!("cargo:rerun-if-changed=wrapper.h");
        println!("cargo:rerun-if-changed=src/helpers.c");
        cc::Build::new()
            .file("src/helpers.c")
            .include(&include)
            .warnings(true)
            .compile("spdk_sys_helpers");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        bindgen::Builder::default()
            .header("wrapper.h")
            .clang_arg(format!("-I{}", include.display()))
            .allowlist_function("spdk_(bdev|bdev_module|thread|poller|io_channel|io_device|get_io_channel|put_io_channel|json|jsonrpc|rpc|log|dma|zmalloc|malloc|free|env|app|spdk_bdev_io)_.*")
            .allowlist_function("spdk_(get_thread|set_thread|thread_send_msg|poller_register|poller_unregister|dma_malloc|dma_zmalloc|dma_free|get_ticks|get_ticks_hz)")
            .allowlist_function("spdk_sys_.*")
            .allowlist_type("spdk_(bdev|bdev_io|bdev_module|bdev_fn_table|bdev_desc|bdev_io_wait_entry|json_.*|jsonrpc_.*|thread|poller|io_channel).*")
            .allowlist_var("SPDK_(BDEV|JSONRPC|LOG|RPC)_.*")
            .derive_default(true)
            .layout_tests(true)
            .generate()
            .expect("bindgen could not parse SPDK's headers")
            .write_to_file(out.join("bindings.rs"))
            .expect("write bindings");
    }
}
