#!/usr/bin/env bash
# Side-by-side speed of capy, llama.cpp and ik_llama.cpp: llama-bench's pp512 and tg128,
# engines interleaved round by round on the same models and threads, then the ratios.
#   bash bench/vs-peers.sh [-t 2] [-r 3] [-n ROUNDS] [-e ENGINES] [MODEL ...]
# MODEL: a capy store name or .gguf path (default: smollm2-135m gemma3-270m).
# ENGINES (comma-separated, default all five):
#   capy            capy at the best instruction set of this CPU
#   capy-avx2       capy with CAPY_ISA=avx2 (what an AVX2-only CPU runs)
#   llama.cpp       llama.cpp built for every x86 feature of this CPU
#   llama.cpp-avx2  llama.cpp built for AVX2 only (no AVX-512, no VNNI)
#   ik_llama.cpp    ik_llama.cpp, its best of -fa 0/1 and -rtr 0/1 (IK_FLAGS overrides
#                   those flags, e.g. IK_FLAGS="-fa 1 -rtr 0,1" for shorter runs)
# Where capy's best level is AVX2 (or llama.cpp's build is the AVX2 one), the two are the
# same program and run once. Two tables follow: the AVX2 level against AVX2-only llama.cpp,
# and the best level against both peers at their best.
# The peers are built (once, cached) by bench/build-peers.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 reps=3 rounds=2 engines=capy,capy-avx2,llama.cpp,llama.cpp-avx2,ik_llama.cpp
while getopts "t:r:n:e:" o; do
  case $o in
    t) threads=$OPTARG ;; r) reps=$OPTARG ;; n) rounds=$OPTARG ;; e) engines=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2-135m gemma3-270m)

PEERS="${CAPY_PEERS_DIR:-$HOME/.cache/capy-peers}"
bash bench/build-peers.sh >/dev/null
cargo build --release -q -p capy
capy=./target/release/capy
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

best_isa=$($capy bench -m "${models[0]}" -p 0 -n 1 -r 1 --json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0].get("cpu_kernels", ""))' || true)
same_llama=0
if cmp -s "$PEERS/llama.cpp/bin/libggml-cpu.so" "$PEERS/llama.cpp-avx2/bin/libggml-cpu.so"; then
  same_llama=1
fi
run_engine() { # engine model-path round
  local e=$1 path=$2 r=$3 f="$out/$1@$3@$(basename "$2").json"
  case $e in
    capy) $capy bench -m "$path" -p 512 -n 128 -t "$threads" -r "$reps" --json > "$f" ;;
    capy-avx2)
      if [ "$best_isa" = avx2 ]; then return; fi
      CAPY_ISA=avx2 $capy bench -m "$path" -p 512 -n 128 -t "$threads" -r "$reps" --json > "$f" ;;
    llama.cpp|llama.cpp-avx2)
      if [ "$e" = llama.cpp-avx2 ] && [ $same_llama = 1 ]; then return; fi
      "$PEERS/$e/bin/llama-bench" -m "$path" -p 512 -n 128 -t "$threads" -r "$reps" -o json \
        > "$f" 2>/dev/null ;;
    ik_llama.cpp)
      "$PEERS/ik_llama.cpp/bin/llama-bench" -m "$path" -p 512 -n 128 -t "$threads" -r "$reps" \
        ${IK_FLAGS:--fa 0,1 -rtr 0,1} -o json > "$f" 2>/dev/null ;;
    *) echo "unknown engine $e" >&2; exit 2 ;;
  esac
}

for m in "${models[@]}"; do
  path=$m
  [ -f "$path" ] || path=$($capy show "$m" | awk '$1 == "path" { print $2 }')
  for r in $(seq "$rounds"); do
    for e in ${engines//,/ }; do
      run_engine "$e" "$path" "$r"
    done
  done
done

python3 - "$out" "$threads" "$best_isa" "$same_llama" "$rounds" "${IK_FLAGS:--fa 0,1 -rtr 0,1}" <<'PY'
import json, os, sys, collections
d, threads, best_isa, same_llama, rounds, ik_flags = sys.argv[1:7]
best = collections.defaultdict(float)   # (engine, model, test) -> best mean t/s over rounds/configs
for f in sorted(os.listdir(d)):
    engine, _, model = f[: -len(".json")].split("@")
    text = open(os.path.join(d, f)).read().strip()
    if not text: continue
    for row in json.loads(text):
        test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        k = (engine, model, test)
        best[k] = max(best[k], row["avg_ts"])
# programs that are the same on this machine share their results
alias = {}
if best_isa == "avx2": alias["capy-avx2"] = "capy"
if same_llama == "1": alias["llama.cpp-avx2"] = "llama.cpp"
get = lambda e, m, t: best.get((alias.get(e, e), m, t), 0.0)
ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
models = sorted({k[1] for k in best})
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"CPU: {cpu}; capy's best kernels: {best_isa or '?'}; threads: {threads}; "
      f"best mean tokens/s over {rounds} interleaved rounds (ik_llama.cpp: best of {ik_flags})\n")
print("AVX2 level: `CAPY_ISA=avx2` capy against llama.cpp built for AVX2 only\n")
print("| model | test | llama.cpp AVX2 | capy AVX2 | capy / llama.cpp |")
print("|---|---|---:|---:|---:|")
for m in models:
    for t in ("pp512", "tg128"):
        l, c = get("llama.cpp-avx2", m, t), get("capy-avx2", m, t)
        print(f"| {m} | {t} | {l:.1f} | {c:.1f} | {ratio(c, l)} |")
print(f"\nBest level ({best_isa or '?'}): capy against both peers at their best\n")
print("| model | test | llama.cpp | ik_llama.cpp | capy | capy / llama.cpp | capy / ik_llama.cpp |")
print("|---|---|---:|---:|---:|---:|---:|")
for m in models:
    for t in ("pp512", "tg128"):
        l, i, c = (get(e, m, t) for e in ("llama.cpp", "ik_llama.cpp", "capy"))
        print(f"| {m} | {t} | {l:.1f} | {i:.1f} | {c:.1f} | {ratio(c, l)} | {ratio(c, i)} |")
PY
