#!/usr/bin/env bash
# aarch64 checks on an x86-64 machine: cross-builds with Debian's rustc (whose arm64
# standard library is installable; rustup's toolchain cannot target aarch64 here), runs the
# kernel parity tests under qemu on emulated CPUs without and with dotprod/i8mm, then
# compares SmolLM2's greedy tokens for a golden prompt under qemu with the x86-64 build's.
# Needs root for apt on a fresh machine; expects scripts/test.sh to have run (x86-64 build
# and the pulled model).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
if ! [ -x /usr/bin/rustc ] || ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  dpkg --add-architecture arm64
  apt-get update -q
  apt-get install -y -q --no-install-recommends rustc-web libstd-rust-web-dev:arm64 \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR=target/aarch64
T=aarch64-unknown-linux-gnu
for cpu in cortex-a72 max; do
  echo "== kernel tests under qemu, CPU $cpu"
  QEMU_CPU=$cpu cargo test --release --target $T -p capy-kernels -- --test-threads=2 2>&1 |
    grep -E "^test result:|FAILED|panicked"
done
cargo build --release --target $T -p capy
prompt=$(python3 -c "import json,sys; g=json.load(open(sys.argv[1])); print(','.join(map(str, g['completions'][0]['prompt_token_ids'])))" \
  ../shared/golden/SmolLM2-135M-Instruct.Q4_1.json)
model=$(target/release/capy show smollm2-135m | awk '$1 == "path" {print $2}')
ids() { python3 -c "import json,sys; print(' '.join(str(t['id']) for t in json.load(sys.stdin)['tokens']))"; }
x86=$(target/release/capy generate -m "$model" --prompt-tokens "$prompt" -n 32 --temp 0 -t 2 --json | ids)
for cpu in cortex-a72 max; do
  arm=$(QEMU_CPU=$cpu qemu-aarch64 target/aarch64/$T/release/capy generate -m "$model" \
    --prompt-tokens "$prompt" -n 32 --temp 0 -t 2 --json | ids)
  if [ "$arm" != "$x86" ]; then
    echo "aarch64 ($cpu) greedy tokens differ from x86-64:"; echo " x86: $x86"; echo " arm: $arm"
    echo "test result: FAILED. 0 passed; 1 failed"
    exit 1
  fi
  echo "aarch64 ($cpu) greedy tokens equal x86-64's: $arm"
done
echo "test result: ok. 1 passed; 0 failed"
