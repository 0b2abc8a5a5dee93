#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test in the
# workspace (engine unit tests, behaviour tests, the crash simulation, the
# standalone host's end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
