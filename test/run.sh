#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test in the
# workspace (engine unit tests, behaviour tests, the crash simulation, the
# standalone host's end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
# Mode 1's tests need PMDK's libpmem2: installed on Debian if missing.
source test/libpmem2.sh
ensure_libpmem2 test/run.sh || exit 1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The SPDK glue, type-checked and linted without SPDK against the SPDK
# declarations committed in spdk-sys/src/surface.rs (test/spdk/run.sh checks
# they are what SPDK's headers give).
cargo clippy -p bdev_writeboost -p wb_ack_check --all-targets \
    --features bdev_writeboost/surface,wb_ack_check/surface -- -D warnings
cargo test --workspace
# The SPDK module against a real SPDK (SPDK_DIR or pkg-config); says SKIPPED without one.
if [ -n "${SPDK_DIR:-}" ]; then
    cargo clippy -p spdk-sys -p bdev_writeboost -p wb_ack_check --all-targets \
        --features bdev_writeboost/spdk,wb_ack_check/spdk -- -D warnings
fi
bash test/spdk/run.sh
