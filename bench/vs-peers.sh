#!/usr/bin/env bash
# Side-by-side speed of capy, llama.cpp and ik_llama.cpp: llama-bench's pp512 and tg128,
# engines interleaved round by round on the same models and threads, then the ratios.
#   bash bench/vs-peers.sh [-t 2] [-r 3] [-n ROUNDS] [MODEL ...]
# MODEL: a capy store name or .gguf path (default: smollm2-135m gemma3-270m).
# The peers are built (once, cached) by bench/build-peers.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 reps=3 rounds=2
while getopts "t:r:n:" o; do
  case $o in t) threads=$OPTARG ;; r) reps=$OPTARG ;; n) rounds=$OPTARG ;; *) exit 2 ;; esac
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

for m in "${models[@]}"; do
  path=$m
  [ -f "$path" ] || path=$($capy show "$m" | awk '$1 == "path" { print $2 }')
  for r in $(seq "$rounds"); do
    "$PEERS/llama.cpp/bin/llama-bench" -m "$path" -p 512 -n 128 -t "$threads" -r "$reps" -o json \
      > "$out/llama.cpp@$r@$(basename "$path").json" 2>/dev/null
    "$PEERS/ik_llama.cpp/bin/llama-bench" -m "$path" -p 512 -n 128 -t "$threads" -r "$reps" \
      -fa 0,1 -rtr 0,1 -o json > "$out/ik_llama.cpp@$r@$(basename "$path").json" 2>/dev/null
    $capy bench -m "$path" -p 512 -n 128 -t "$threads" -r "$reps" --json \
      > "$out/capy@$r@$(basename "$path").json"
  done
done

python3 - "$out" "$threads" <<'PY'
import json, os, sys, collections
d, threads = sys.argv[1], sys.argv[2]
best = collections.defaultdict(float)   # (engine, model, test) -> best mean t/s over rounds/configs
for f in sorted(os.listdir(d)):
    engine, _, model = f[: -len(".json")].split("@")
    text = open(os.path.join(d, f)).read().strip()
    if not text: continue
    for row in json.loads(text):
        test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        k = (engine, model, test)
        best[k] = max(best[k], row["avg_ts"])
models = sorted({k[1] for k in best})
print(f"threads: {threads}; best mean tokens/s over rounds (ik_llama.cpp: best of -fa 0/1, -rtr 0/1)\n")
print("| model | test | llama.cpp | ik_llama.cpp | capy | capy / llama.cpp | capy / ik_llama.cpp |")
print("|---|---|---:|---:|---:|---:|---:|")
for m in models:
    for test in ("pp512", "tg128"):
        l, i, c = (best.get((e, m, test), 0.0) for e in ("llama.cpp", "ik_llama.cpp", "capy"))
        ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
        print(f"| {m} | {test} | {l:.1f} | {i:.1f} | {c:.1f} | {ratio(c, l)} | {ratio(c, i)} |")
PY
