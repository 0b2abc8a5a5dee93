#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test in the
# workspace (engine unit tests, behaviour tests, the crash simulation, the
# standalone host's end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
# PMDK's libpmem2 maps mode 1's pmem pools (loaded at run time, so only the
# mode 1 tests need it); install it on Debian if it is missing.
if ! ldconfig -p | grep -c 'libpmem2\.so' >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends libpmem2 >/dev/null
fi
if ! ldconfig -p | grep -c 'libpmem2\.so' >/dev/null; then
    echo "test/run.sh: the mode 1 tests need PMDK's libpmem2: apt-get install libpmem2 (as root)" >&2
    exit 1
fi
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
