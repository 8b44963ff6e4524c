#!/usr/bin/env bash
# Ternary (BitNet b1.58) speed: capy's TQ2_0, TQ1_0 and Q4_0 of one synthetic 2B model
# against llama.cpp b11312 (TQ2_0, TQ1_0) and ik_llama.cpp (IQ2_BN, its ternary type, with
# -fa 1 -rtr 1), llama-bench's pp512 and tg128, engines interleaved round by round, at 2 and
# 1 threads; then the means and the ratios the issue asks for.
#   bash bench/ternary.sh [-r REPS] [-n ROUNDS] [-a bitnet|llama] [-d DIR] [-e ENGINES]
# ENGINES (comma-separated; default all): capy-TQ2_0 capy-TQ1_0 capy-Q4_0 llama.cpp-TQ2_0
# llama.cpp-TQ1_0 ik-IQ2_BN. A run takes 1-3 minutes per engine and thread count.
# The models (about 7 GB in DIR, default /work/syn or $CAPY_SYN_DIR) are made once:
#   F16 by capy's synthetic example (BitNet b1.58 2B4T's shape, SmolLM2's vocabulary,
#   ternary weights; -a llama: the same as a llama model, TriLM-style), TQ1_0/TQ2_0/Q4_0 by
#   `capy quantize` (byte for byte llama-quantize's for the ternary types), IQ2_BN by
#   ik_llama.cpp's llama-quantize. The peers come from bench/build-peers.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=2 rounds=1 arch=bitnet dir="${CAPY_SYN_DIR:-/work/syn}"
engines="capy-TQ2_0,capy-TQ1_0,capy-Q4_0,llama.cpp-TQ2_0,llama.cpp-TQ1_0,ik-IQ2_BN"
while getopts "r:n:a:d:e:" o; do
  case $o in
    r) reps=$OPTARG ;; n) rounds=$OPTARG ;; a) arch=$OPTARG ;; d) dir=$OPTARG ;;
    e) engines=$OPTARG ;;
    *) exit 2 ;;
  esac
done
PEERS="${CAPY_PEERS_DIR:-$HOME/.cache/capy-peers}"
bash bench/build-peers.sh >/dev/null
cargo build --release -q -p capy
cargo build --release -q -p capy-model --example synthetic
capy=./target/release/capy
vocab="${CAPY_HOME:-$HOME/.capy}/models/smollm2-135m.gguf"
[ -f "$vocab" ] || $capy pull smollm2-135m
mkdir -p "$dir"
name=$([ "$arch" = bitnet ] && echo bitnet2b || echo trilm2b)
f16="$dir/$name-f16.gguf"
need_f16() { # the F16 model, made when a quantized file is missing
  [ -f "$f16" ] && return
  local extra=()
  [ "$arch" = llama ] && extra=(--arch llama --no-scale-tensors)
  ./target/release/examples/synthetic "${extra[@]}" --vocab-from "$vocab" --out "$f16"
}
for t in TQ2_0 TQ1_0 Q4_0; do
  [ -f "$dir/$name-$t.gguf" ] || { need_f16; $capy quantize "$f16" "$dir/$name-$t.gguf" "$t"; }
done
if [ ! -f "$dir/$name-IQ2_BN.gguf" ]; then
  need_f16
  "$PEERS/ik_llama.cpp/bin/llama-quantize" "$f16" "$dir/$name-IQ2_BN.gguf" IQ2_BN 2 >/dev/null 2>&1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { # label threads round
  local f="$out/$1@$2@$3.json"
  case $1 in
    capy-*) $capy bench -m "$dir/$name-${1#capy-}.gguf" -p 512 -n 128 -t "$2" -r "$reps" --json > "$f" 2>/dev/null ;;
    llama.cpp-*) "$PEERS/llama.cpp/bin/llama-bench" -m "$dir/$name-${1#llama.cpp-}.gguf" -p 512 \
      -n 128 -t "$2" -r "$reps" -o json > "$f" 2>/dev/null ;;
    ik-IQ2_BN) "$PEERS/ik_llama.cpp/bin/llama-bench" -m "$dir/$name-IQ2_BN.gguf" -p 512 -n 128 \
      -t "$2" -r "$reps" -fa 1 -rtr 1 -o json > "$f" 2>/dev/null ;;
  esac
}
for threads in 2 1; do
  for r in $(seq "$rounds"); do
    for e in ${engines//,/ }; do
      echo "round $r, $threads threads: $e" >&2
      run "$e" "$threads" "$r"
    done
  done
done
python3 - "$out" "$name" <<'PY'
import collections, json, os, sys
out, name = sys.argv[1], sys.argv[2]
res = collections.defaultdict(list)
for f in os.listdir(out):
    engine, threads, _ = f[:-len(".json")].split("@")
    text = open(os.path.join(out, f)).read()
    for row in json.loads(text or "[]"):
        test = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        res[(engine, int(threads), test)].append(row["avg_ts"])
def mean(k):
    return sum(res[k]) / len(res[k]) if res.get(k) else float("nan")
engines = ["capy-TQ2_0", "capy-TQ1_0", "capy-Q4_0", "llama.cpp-TQ2_0", "llama.cpp-TQ1_0", "ik-IQ2_BN"]
print(f"\n{name}: tokens/s, mean of the rounds (each llama-bench's mean of its reps)\n")
print("| threads | test | " + " | ".join(engines) + " | TQ2_0/ik | TQ1_0/ik | TQ2_0/Q4_0 | TQ1_0/Q4_0 |")
print("|---|---|" + "---:|" * (len(engines) + 4))
for threads in (2, 1):
    for test in ("pp512", "tg128"):
        m = {e: mean((e, threads, test)) for e in engines}
        def r(a, b):
            return m[a] / m[b] if m[b] == m[b] and m[b] > 0 else float("nan")
        print(f"| {threads} | {test} | " + " | ".join(f"{m[e]:.2f}" for e in engines) +
              f" | {r('capy-TQ2_0', 'ik-IQ2_BN'):.2f} | {r('capy-TQ1_0', 'ik-IQ2_BN'):.2f}"
              f" | {r('capy-TQ2_0', 'capy-Q4_0'):.2f} | {r('capy-TQ1_0', 'capy-Q4_0'):.2f} |")
PY
