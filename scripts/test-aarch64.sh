#!/usr/bin/env bash
# aarch64 checks on an x86-64 machine: cross-builds with Debian's rustc (whose arm64
# standard library is installable; rustup's toolchain cannot target aarch64 here), then under
# qemu on three emulated CPUs, so every NEON level runs:
#   cortex-a72  NEON only              (table "neon")
#   neoverse-n1 NEON + dotprod         (table "neon+dotprod", repacked weights with sdot)
#   max         NEON + dotprod + i8mm  (table "neon+dotprod+i8mm", repacked weights with usmmla)
# 1. the kernel parity tests (every level the CPU has against the scalar reference);
# 2. SmolLM2's greedy tokens for the golden prompts (up to llama.cpp's first near-tie) equal
#    the x86-64 build's, on each CPU and with CAPY_ISA=scalar;
# 3. the golden teacher-forced tests against llama.cpp's logprobs: SmolLM2 on the dotprod
#    CPU, Gemma 3 on the i8mm CPU (the NEON-only CPU takes ~4 minutes per model under qemu;
#    steps 1 and 2 cover that level).
# Needs root for apt on a fresh machine; expects scripts/test.sh to have run (x86-64 build
# and the pulled models).
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
CPUS="cortex-a72 neoverse-n1 max"
passed=0
fail() { echo "$1"; echo "test result: FAILED. $passed passed; 1 failed"; exit 1; }

for cpu in $CPUS; do
  echo "== kernel tests under qemu, CPU $cpu"
  QEMU_CPU=$cpu cargo test --release --target $T -p capy-kernels -- --test-threads=2 2>&1 |
    grep -E "^test result: .* [1-9][0-9]* passed|FAILED|panicked"
  QEMU_CPU=$cpu cargo test --release --target $T -p capy-kernels dispatch -- --nocapture 2>&1 |
    grep "kernel variants"
  passed=$((passed + 1))
done

cargo build --release --target $T -p capy
golden=../shared/golden/SmolLM2-135M-Instruct.Q4_1.json
# each golden prompt with its greedy tokens up to the first step where llama.cpp's top-2 are
# within 0.5 nats (the golden tests' near-tie rule): past a near-tie, a different order of
# float additions may pick the other token on any machine
cases=$(python3 - "$golden" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
for c in g["completions"]:
    gaps = [s["top5"][0]["logprob"] - s["top5"][1]["logprob"] for s in c["steps"]]
    n = next((i for i, gap in enumerate(gaps) if gap < 0.5), len(gaps))
    if n > 0:
        print(f"{n}:" + ",".join(map(str, c["prompt_token_ids"])))
PY
)
[ -n "$cases" ] || fail "no golden prompt without an early near-tie"
model=$(target/release/capy show smollm2-135m | awk '$1 == "path" {print $2}')
ids() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d['kernels'] + ':', ' '.join(str(t['id']) for t in d['tokens']))"; }
gen() { "$@" generate -m "$model" --prompt-tokens "$prompt" -n "$n" --temp 0 -t 2 --json | ids; }
n_tokens=0
for case in $cases; do
  n=${case%%:*} prompt=${case#*:}
  x86=$(gen target/release/capy)
  x86=${x86#*: }
  for run in cortex-a72 neoverse-n1 max max:scalar; do
    cpu=${run%%:*}
    isa=$([ "$run" = "$cpu" ] && echo "" || echo "${run#*:}")
    arm=$(QEMU_CPU=$cpu CAPY_ISA=$isa gen qemu-aarch64 target/aarch64/$T/release/capy)
    [ "${arm#*: }" = "$x86" ] || fail "aarch64 ($cpu, kernels ${arm%%:*}) greedy tokens for prompt [$prompt] differ from x86-64's:
 x86: $x86
 arm: ${arm#*: }"
  done
  n_tokens=$((n_tokens + n))
  echo "prompt [$prompt]: $n greedy tokens equal x86-64's on every CPU and with CAPY_ISA=scalar"
done
echo "aarch64 greedy tokens equal x86-64's: $n_tokens tokens over $(echo "$cases" | wc -l) golden prompts"
passed=$((passed + 1))

# SmolLM2 (Q4_1, SwiGLU) on the dotprod CPU, Gemma 3 (Q4_K/Q6_K, GeGLU, sliding window) on
# the i8mm CPU
for run in neoverse-n1:smollm2 max:gemma3; do
  cpu=${run%%:*} model_test=${run#*:}_teacher_forced_matches_llama_cpp
  echo "== golden teacher-forced test under qemu, CPU $cpu: $model_test"
  QEMU_CPU=$cpu cargo test --release --target $T -p capy-engine --test golden_logprobs \
    "$model_test" -- --exact --nocapture 2>&1 |
    grep -E "^test result: .* 1 passed|vs llama.cpp|FAILED|panicked"
  passed=$((passed + 1))
done
echo "test result: ok. $passed passed; 0 failed"
