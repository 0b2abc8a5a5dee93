//! Raw bindings to SPDK, generated at build time by bindgen from the headers
//! of an installed SPDK (feature `spdk`; SPDK is found through `SPDK_DIR` or
//! pkg-config). No safe API lives here: the bdev module wraps what it uses.
//!
//! Without the `spdk` feature this crate is empty, so the workspace builds
//! where SPDK is absent.

#![cfg_attr(
    feature = "spdk",
    allow(
        non_upper_case_globals,
        non_camel_case_types,
        non_snake_case,
        unnecessary_transmutes,
        clippy::all
    )
)]

#[cfg(feature = "spdk")]
include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
