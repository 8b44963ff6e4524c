#!/usr/bin/env bash
# The AVX2 level is what an AVX2-only CPU runs, whatever CPU this is: the kernel tests run
# under qemu emulating a Haswell (AVX2, FMA, F16C; no AVX-512, no VNNI), where any AVX-512 or
# VNNI instruction in the scalar or AVX2 tables would stop the test with SIGILL, and the
# dispatch test must see exactly the levels scalar and avx2. Then capy's greedy tokens and
# logprobs under the emulated Haswell must equal those of the native build with
# CAPY_ISA=avx2 (the same kernels, so the same numbers).
# Needs root for apt on a fresh machine (qemu-user); expects scripts/test.sh to have run
# (release build, models in the store).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
if ! command -v qemu-x86_64 >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends qemu-user
fi
cpu=Haswell
runner="qemu-x86_64 -cpu $cpu"

echo "== kernel tests under qemu, CPU $cpu"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$runner" \
  cargo test --release -p capy-kernels -- --nocapture 2>&1 | grep -v 'TCG doesn' | tee "$log" |
  grep -E '^test result|kernel variants'
grep -q 'kernel variants on this CPU: \["scalar", "avx2"\]' "$log" ||
  { echo "the emulated $cpu should have exactly the levels scalar and avx2" >&2; exit 1; }
grep -q '^test result: ok' "$log" || { echo "kernel tests failed under qemu" >&2; exit 1; }

echo "== greedy tokens under qemu ($cpu) vs native CAPY_ISA=avx2"
cargo build --release -q -p capy
gen() { # runner... -> "id:logprob ..." of 8 greedy tokens
  "$@" target/release/capy generate -m smollm2-135m --prompt "The capital of France is" \
    -n 8 --temp 0 -t 2 --json 2>/dev/null |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["kernels"], " ".join("%d:%.5f" % (t["id"], t["logprob"]) for t in d["tokens"]))'
}
emulated=$(gen $runner)
native=$(CAPY_ISA=avx2 gen env)
echo "emulated $cpu: $emulated"
echo "native avx2:   $native"
[ "$emulated" = "$native" ] || { echo "the emulated AVX2-only CPU and CAPY_ISA=avx2 differ" >&2; exit 1; }
echo "x86 levels: CAPY_ISA=avx2 runs what an AVX2-only CPU runs"
