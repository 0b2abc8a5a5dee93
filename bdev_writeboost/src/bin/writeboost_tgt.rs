//! `writeboost_tgt`: SPDK's target application with the writeboost module
//! linked in. It takes spdk_tgt's command line (`-m`, `-r`, `-c`/`--json`,
//! `--no-huge`, `-s`, ...) and serves every SPDK JSON-RPC method plus the
//! `bdev_writeboost_*` ones. Like spdk_tgt, `-S DIR` is where vhost-user
//! sockets are created and `-f FILE` receives the process id once started.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use spdk_sys as sys;

// Pull the module in: its constructors register it and its RPC methods.
use bdev_writeboost as _;

/// spdk_tgt's own options on top of SPDK's application options.
const OPTS: &CStr = c"f:S:";
static PID_FILE: OnceLock<String> = OnceLock::new();

extern "C" fn parse_arg(ch: c_int, arg: *mut c_char) -> c_int {
    if arg.is_null() {
        return -EINVAL;
    }
    // SAFETY: SPDK passes the option's argument, a NUL-terminated string
    // from argv, which lives as long as the process.
    let value = unsafe { CStr::from_ptr(arg) };
    match u8::try_from(ch) {
        Ok(b'f') => {
            let _ = PID_FILE.set(value.to_string_lossy().into_owned());
            0
        }
        // SAFETY: as above; SPDK copies the path.
        Ok(b'S') => unsafe { sys::spdk_vhost_set_socket_path(arg) },
        _ => -EINVAL,
    }
}

const EINVAL: c_int = 22;

unsafe extern "C" {
    /// C stdio's flush; SPDK prints its usage text through C's buffered stdout.
    fn fflush(stream: *mut c_void) -> c_int;
}

extern "C" fn usage() {
    // SAFETY: fflush(NULL) flushes every C output stream; it takes no pointer we own.
    unsafe { fflush(std::ptr::null_mut()) };
    println!(" -f <file>                 pidfile save pid to file under given path");
    println!(" -S <path>                 directory where to create vhost sockets (default: pwd)");
}

extern "C" fn started(_arg: *mut c_void) {
    if let Some(path) = PID_FILE.get()
        && let Err(e) = std::fs::write(path, format!("{}\n", std::process::id()))
    {
        eprintln!("writeboost_tgt: cannot write pid file {path}: {e}");
        std::process::exit(1);
    }
}

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
            OPTS.as_ptr(),
            std::ptr::null_mut(),
            Some(parse_arg),
            Some(usage),
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
