#!/usr/bin/env bash
# Fuzzes every on-disk and on-pmem parser and the NBD protocol parser for $1 seconds each (default 60).
# Uses cargo-fuzz (installed if missing); RUSTC_BOOTSTRAP lets it use the
# sanitizer flags it needs on a stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in superblock record segment pmem_slot checkpoint nbd; do
    echo "fuzzing $target for ${secs}s"
    cargo fuzz run "$target" -- -max_total_time="$secs" -max_len=65536
done
