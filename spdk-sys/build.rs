//! Finds SPDK and generates bindings for the parts the bdev module uses.
//! Without the `spdk` feature nothing is generated, so the workspace builds
//! on machines without SPDK.

#[cfg(feature = "spdk")]
#[path = "surface_list.rs"]
mod surface;

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    #[cfg(feature = "spdk")]
    spdk::generate();
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::path::PathBuf;
    use std::process::Command;

    /// What was found: the include directory, library search directories and
    /// the linker arguments an SPDK application needs.
    struct Found {
        include: PathBuf,
        lib_dirs: Vec<PathBuf>,
        app_libs: Vec<String>,
    }

    /// Libraries spdk_tgt links: the event framework, every bdev, accel and
    /// sock module, NVMe-oF, vhost, NBD, and the DPDK environment.
    const APP_PACKAGES: [&str; 12] = [
        "spdk_event",
        "spdk_event_bdev",
        "spdk_event_accel",
        "spdk_event_nvmf",
        "spdk_event_nbd",
        "spdk_event_vhost_blk",
        "spdk_event_vhost_scsi",
        "spdk_bdev_modules",
        "spdk_accel_modules",
        "spdk_sock_modules",
        "spdk_env_dpdk",
        "spdk_syslibs",
    ];

    fn pkg_config(path: Option<&PathBuf>, args: &[&str]) -> Option<String> {
        let mut cmd = Command::new("pkg-config");
        if let Some(p) = path {
            let shim = ocfenv_shim(p);
            let mut dirs = vec![p.clone()];
            dirs.extend(shim);
            cmd.env(
                "PKG_CONFIG_PATH",
                std::env::join_paths(dirs).expect("pkg-config path"),
            );
        }
        let out = cmd
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// SPDK built with OCF names `spdk_ocfenv` in spdk_bdev_modules.pc but
    /// does not write spdk_ocfenv.pc (the library is static only), which
    /// breaks every pkg-config query of the tree. Supply the missing file.
    fn ocfenv_shim(pc_dir: &std::path::Path) -> Option<PathBuf> {
        let lib = pc_dir.parent()?;
        if pc_dir.join("spdk_ocfenv.pc").exists() || !lib.join("libspdk_ocfenv.a").exists() {
            return None;
        }
        let out = PathBuf::from(std::env::var("OUT_DIR").ok()?).join("pkgconfig");
        std::fs::create_dir_all(&out).ok()?;
        let pc = format!(
            "Name: spdk_ocfenv\nDescription: SPDK OCF environment\nVersion: 1.0\nLibs: -L{} -lspdk_ocfenv\n",
            lib.display()
        );
        std::fs::write(out.join("spdk_ocfenv.pc"), pc).ok()?;
        Some(out)
    }

    fn locate() -> Found {
        let pc_dir = std::env::var("SPDK_DIR").ok().map(|dir| {
            let dir = PathBuf::from(dir);
            [dir.join("build/lib/pkgconfig"), dir.join("lib/pkgconfig")]
                .into_iter()
                .find(|p| p.join("spdk_bdev.pc").exists())
                .unwrap_or_else(|| {
                    panic!(
                        "SPDK_DIR={} has neither build/lib/pkgconfig/spdk_bdev.pc (a built source tree) \
                         nor lib/pkgconfig/spdk_bdev.pc (an installed SPDK)",
                        dir.display()
                    )
                })
        });
        let cflags =
            pkg_config(pc_dir.as_ref(), &["--cflags-only-I", "spdk_bdev"]).unwrap_or_else(|| {
                panic!(
                    "SPDK not found: set SPDK_DIR to a built SPDK source tree or install prefix, \
                 or make `pkg-config spdk_bdev` work"
                )
            });
        let include = cflags
            .split_whitespace()
            .filter_map(|t| t.strip_prefix("-I"))
            .map(PathBuf::from)
            .find(|p| p.join("spdk/bdev_module.h").exists())
            .expect("pkg-config spdk_bdev names no include directory holding spdk/bdev_module.h");
        let mut args = vec!["--libs"];
        args.extend(APP_PACKAGES);
        let libs = pkg_config(pc_dir.as_ref(), &args)
            .expect("pkg-config could not resolve the SPDK application libraries");
        let mut lib_dirs: Vec<PathBuf> = Vec::new();
        for t in libs.split_whitespace() {
            if let Some(d) = t.strip_prefix("-L") {
                let d = PathBuf::from(d);
                if !lib_dirs.contains(&d) {
                    lib_dirs.push(d);
                }
            }
        }
        // Module libraries register themselves from constructors, so none may
        // be dropped as unused; rpath lets the binary run without LD_LIBRARY_PATH.
        let mut app_libs = vec!["-Wl,--no-as-needed".to_string()];
        app_libs.extend(libs.split_whitespace().map(str::to_string));
        app_libs.push("-Wl,--as-needed".into());
        for d in &lib_dirs {
            app_libs.push(format!("-Wl,-rpath,{}", d.display()));
        }
        Found {
            include,
            lib_dirs,
            app_libs,
        }
    }

    /// bindgen loads libclang to read SPDK's headers; without it bindgen
    /// panics with "Unable to find libclang". Say what to install instead.
    fn require_libclang() {
        println!("cargo:rerun-if-env-changed=LIBCLANG_PATH");
        if std::env::var_os("LIBCLANG_PATH").is_some() {
            return;
        }
        // bindgen looks for libclang.so* or libclang-N.so*; libclang-cpp
        // (LLVM's C++ library, often installed alone) is not it.
        let is_libclang = |name: &str| {
            name.strip_prefix("libclang").is_some_and(|rest| {
                rest.starts_with(".so")
                    || rest
                        .strip_prefix('-')
                        .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
            })
        };
        let mut dirs: Vec<PathBuf> = [
            "/usr/lib",
            "/usr/lib64",
            "/usr/local/lib",
            "/usr/lib/x86_64-linux-gnu",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        if let Ok(entries) = std::fs::read_dir("/usr/lib") {
            dirs.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
                    .map(|e| e.path().join("lib")),
            );
        }
        let found = dirs.iter().any(|d| {
            std::fs::read_dir(d).is_ok_and(|entries| {
                entries
                    .filter_map(Result::ok)
                    .any(|e| is_libclang(&e.file_name().to_string_lossy()))
            })
        });
        if !found {
            panic!(
                "building the SPDK module needs libclang (bindgen reads SPDK's headers with it): \
                 apt-get install libclang-dev, or set LIBCLANG_PATH to the directory holding libclang.so"
            );
        }
    }

    pub fn generate() {
        require_libclang();
        let Found {
            include,
            lib_dirs,
            app_libs,
        } = locate();
        // No -l here: the shared module resolves SPDK's symbols from the
        // spdk_tgt that preloads it; executables link `app_libs` themselves.
        for d in &lib_dirs {
            println!("cargo:rustc-link-search=native={}", d.display());
        }
        println!("cargo:include={}", include.display());
        println!("cargo:app_libs={}", app_libs.join(" "));
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
        println!("cargo:rerun-if-changed=wrapper.h");
        println!("cargo:rerun-if-changed=src/helpers.c");
        cc::Build::new()
            .file("src/helpers.c")
            .include(&include)
            .warnings(true)
            .flag_if_supported("-Wno-unused-parameter")
            .compile("spdk_sys_helpers");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let mut b = bindgen::Builder::default()
            .header("wrapper.h")
            .clang_arg(format!("-I{}", include.display()));
        // Exactly what the glue uses (and what its types need): this list is
        // the module's SPDK surface, committed as src/surface.rs.
        for f in crate::surface::FUNCTIONS {
            b = b.allowlist_function(f);
        }
        for t in crate::surface::TYPES {
            b = b.allowlist_type(t);
        }
        let bindings = b
            // Fields of these are reached through helpers.c; their NVMe
            // passthrough unions are packed bitfields bindgen cannot lay out.
            .opaque_type("spdk_bdev")
            .opaque_type("spdk_bdev_io")
            .opaque_type("spdk_bdev_ext_io_opts")
            .opaque_type("spdk_nvme_.*")
            .opaque_type("spdk_bdev_nvme_.*")
            .opaque_type("spdk_bdev_io_nvme_.*")
            .derive_debug(false)
            .wrap_unsafe_ops(true)
            .derive_default(true)
            .layout_tests(true)
            .generate()
            .expect("bindgen could not parse SPDK's headers")
            .to_string();
        std::fs::write(out.join("bindings.rs"), &bindings).expect("write bindings");
        // The committed surface must be what these headers give: CI checks
        // the glue against it. SPDK_SYS_UPDATE_SURFACE=1 refreshes it (after
        // the glue uses something new, or for a new SPDK release);
        // SPDK_SYS_REQUIRE_SURFACE=1 (test/spdk/run.sh) fails on a mismatch.
        println!("cargo:rerun-if-env-changed=SPDK_SYS_UPDATE_SURFACE");
        println!("cargo:rerun-if-env-changed=SPDK_SYS_REQUIRE_SURFACE");
        println!("cargo:rerun-if-changed=src/surface.rs");
        let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
        let stamped = crate::surface::stamp(&bindings);
        if std::env::var_os("SPDK_SYS_UPDATE_SURFACE").is_some() {
            std::fs::write(dir.join("src/surface.rs"), &stamped).expect("write src/surface.rs");
        } else if std::fs::read_to_string(dir.join("src/surface.rs"))
            .ok()
            .as_deref()
            != Some(stamped.as_str())
        {
            let msg = "src/surface.rs differs from what this SPDK's headers give: \
                       CI's type-check of the glue is then not against these signatures; \
                       refresh it with SPDK_SYS_UPDATE_SURFACE=1";
            if std::env::var_os("SPDK_SYS_REQUIRE_SURFACE").is_some() {
                panic!("{msg}");
            }
            println!("cargo:warning={msg}");
        }
    }
}
