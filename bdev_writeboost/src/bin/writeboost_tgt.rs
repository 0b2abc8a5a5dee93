//! `writeboost_tgt`: SPDK's target application with the writeboost module
//! linked in. It takes spdk_tgt's command line (`-m`, `-r`, `-c`/`--json`,
//! `--no-huge`, `-s`, ...) and serves every SPDK JSON-RPC method plus the
//! `bdev_writeboost_*` ones.

use std::ffi::{CString, c_char, c_void};

use spdk_sys as sys;

// Pull the module in: its constructors register it and its RPC methods.
use bdev_writeboost as _;

extern "C" fn started(_arg: *mut c_void) {}

fn main() {
    let args: Vec<CString> = std::env::args()
        .map(|a| CString::new(a).unwrap_or_default())
        .collect();
    let mut argv: Vec<*mut c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let name = c"writeboost_tgt";
    let mut opts = sys::spdk_app_opts::default();
    // SAFETY: opts is a valid out-parameter of the stated size; argv is a
    // NUL-terminated array of C strings that outlives the application; the
    // app is stopped and finished before the process exits.
    let rc = unsafe {
        sys::spdk_app_opts_init(&mut opts, std::mem::size_of::<sys::spdk_app_opts>());
        opts.name = name.as_ptr();
        let rc = sys::spdk_app_parse_args(
            argv.len() as i32 - 1,
            argv.as_mut_ptr(),
            &mut opts,
            std::ptr::null(),
            std::ptr::null_mut(),
            None,
            None,
        );
        if rc != sys::spdk_app_parse_args_rvals_SPDK_APP_PARSE_ARGS_SUCCESS {
            std::process::exit(
                if rc == sys::spdk_app_parse_args_rvals_SPDK_APP_PARSE_ARGS_HELP {
                    0
                } else {
                    1
                },
            );
        }
        let rc = sys::spdk_app_start(&mut opts, Some(started), std::ptr::null_mut());
        sys::spdk_app_fini();
        rc
    };
    std::process::exit(rc);
}
