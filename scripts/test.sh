#!/usr/bin/env bash
# capy's full test suite: builds capy, pulls the two real models the golden tests use into
# the store (a no-op when they are there), then runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release -p capy
for m in smollm2-135m gemma3-270m; do
  ./target/release/capy pull "$m"
done
cargo test --release --workspace -- --test-threads=2
