#!/usr/bin/env bash
# Serving under load, capy serve vs llama-server, side by side in one run.
#   bash bench/vs-server.sh [-t THREADS] [-n ROUNDS] [-k TOKENS] [-C "16 4"] [-T TEMP] [MODEL]
# Starts each server in turn (never both at once) on the same model and threads, runs
# bench/serve-load.py at each concurrency, and alternates the servers for ROUNDS rounds
# (the machine is noisy); prints one JSON line per run and a markdown table of medians.
# llama-server comes from bench/build-peers.sh ($CAPY_PEERS_DIR, default
# ~/.cache/capy-peers); it runs with -np 4 -cb (4 slots, continuous batching) and
# 2048 positions per slot, as capy runs 16 sequences of 2048.
set -euo pipefail
cd "$(dirname "$0")/.."
T=2; ROUNDS=2; TOKENS=64; CONC="16 4"; TEMP=0
while getopts "t:n:k:C:T:" o; do
  case $o in t) T=$OPTARG;; n) ROUNDS=$OPTARG;; k) TOKENS=$OPTARG;; C) CONC=$OPTARG;; T) TEMP=$OPTARG;;
             *) echo "usage: $0 [-t T] [-n ROUNDS] [-k TOKENS] [-C \"16 4\"] [-T TEMP] [MODEL]"; exit 2;; esac
done
shift $((OPTIND - 1))
MODEL=${1:-smollm2-135m}
PEERS="${CAPY_PEERS_DIR:-$HOME/.cache/capy-peers}"
LLAMA_SERVER="$PEERS/llama.cpp/bin/llama-server"
[ -x "$LLAMA_SERVER" ] || { echo "no $LLAMA_SERVER: run bash bench/build-peers.sh" >&2; exit 1; }
cargo build --release -q -j2 -p capy
CAPY=target/release/capy
MODEL_PATH=$($CAPY show "$MODEL" | awk '$1 == "path" {print $2}')
PORT=18731
OUT=$(mktemp)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -f "$OUT"' EXIT

wait_ready() {
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server did not become ready" >&2; return 1
}

run_server() { # label, command...
  local label=$1; shift
  "$@" >/tmp/vs-server-$label.log 2>&1 &
  local pid=$!
  wait_ready
  for c in $CONC; do
    python3 bench/serve-load.py --url "http://127.0.0.1:$PORT" --model "$MODEL" \
      -c "$c" --tokens "$TOKENS" -T "$TEMP" --label "$label" --json | tee -a "$OUT"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for r in $(seq 1 "$ROUNDS"); do
  run_server llama-server "$LLAMA_SERVER" -m "$MODEL_PATH" -t "$T" -np 4 -cb -c 8192 \
    --port "$PORT" --no-webui
  run_server capy "$CAPY" serve -m "$MODEL" -t "$T" --parallel 16 -c 2048 --port "$PORT"
done

python3 - "$OUT" "$MODEL" "$T" "$TEMP" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
model, t = sys.argv[2], sys.argv[3]
def med(label, c, key):
    xs = [r[key] for r in rows if r["label"] == label and r["concurrency"] == c]
    return statistics.median(xs) if xs else float("nan")
print(f"\n{model}, {t} threads, temperature {sys.argv[4]}, {rows[0]['tokens_per_request']} tokens per request, "
      f"medians of {len(rows) // 2 // len({r['concurrency'] for r in rows})} rounds\n")
print("| concurrency | server | agg tok/s | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms | ITL p99 ms | complete |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for c in sorted({r["concurrency"] for r in rows}, reverse=True):
    for label in ("llama-server", "capy"):
        done = [r for r in rows if r["label"] == label and r["concurrency"] == c]
        ok = f"{sum(r['complete'] for r in done)}/{sum(r['requests'] for r in done)}"
        print(f"| {c} | {label} | {med(label, c, 'agg_tok_s'):.1f} | {med(label, c, 'ttft_p50_ms'):.1f} | "
              f"{med(label, c, 'ttft_p90_ms'):.1f} | {med(label, c, 'itl_p50_ms'):.2f} | "
              f"{med(label, c, 'itl_p90_ms'):.2f} | {med(label, c, 'itl_p99_ms'):.2f} | {ok} |")
    a, b = med("capy", c, "agg_tok_s"), med("llama-server", c, "agg_tok_s")
    ta, tb = med("capy", c, "ttft_p50_ms"), med("llama-server", c, "ttft_p50_ms")
    print(f"| {c} | capy / llama-server | {a / b:.2f}x | {ta / tb:.2f}x | | | | | |")
EOF
