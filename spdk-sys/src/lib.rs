//! Raw bindings to SPDK, generated at build time by bindgen from the headers
//! of an installed SPDK (feature `spdk`; SPDK is found through `SPDK_DIR` or
//! pkg-config). No safe API lives here: the bdev module wraps what it uses.
//!
//! Without the `spdk` feature this crate is empty, so the workspace builds
//! where SPDK is absent. With `surface` instead it holds the declarations
//! committed in `src/surface.rs`: exactly what bindgen generates for the
//! items listed in `surface_list.rs`, enough to type-check (not link) the
//! module on a machine without SPDK.

#![cfg_attr(
    any(feature = "spdk", feature = "surface"),
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

// Without SPDK: the same declarations as committed, so CI type-checks the
// glue against SPDK's real signatures (test/spdk/run.sh keeps them equal).
#[cfg(all(feature = "surface", not(feature = "spdk")))]
include!("surface.rs");
