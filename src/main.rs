//! `writeboost`, the standalone host: everything is in the `writeboost-host`
//! library (host/); this binary only names the build it is.

use std::process::ExitCode;

fn main() -> ExitCode {
    writeboost_host::cli::main(writeboost_host::Build {
        version: env!("CARGO_PKG_VERSION"),
        // Stamped by build.rs.
        git_rev: env!("WRITEBOOST_GIT_REV"),
    })
}
