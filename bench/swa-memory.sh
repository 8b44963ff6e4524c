#!/usr/bin/env bash
# The KV pool and RSS of `capy serve` for a model with sliding-window layers, after four
# concurrent long prompts. Usage: bench/swa-memory.sh [MODEL] [extra serve flags, e.g. --swa-full]
# Prints /api/ps's kv_cache before and after, one usage object, and the server's RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-gemma3-270m}"
shift || true
PORT="${PORT:-18080}"
CAPY="${CAPY:-target/release/capy}"
"$CAPY" serve -m "$MODEL" --port "$PORT" -t 2 "$@" >/tmp/swa-memory-serve.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 240); do
  curl -sf "localhost:$PORT/api/ps" | grep -q "$MODEL" && break
  sleep 0.5
done
PORT="$PORT" MODEL="$MODEL" python3 - <<'PY'
import json, os, threading, urllib.request
base = f"http://localhost:{os.environ['PORT']}"
model = os.environ["MODEL"]
def ps():
    return json.load(urllib.request.urlopen(base + "/api/ps"))["models"][0]
def post(body):
    r = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(r, timeout=900))
p = ps()
print("before", p["size"], p["kv_cache"])
prompt = " ".join(f"Note {i}: item {i} has value {i * 7 % 13}." for i in range(400))
outs = []
def go(k):
    outs.append(post({"model": model, "prompt": f"{k} " + prompt, "max_tokens": 32,
                      "temperature": 0}))
ts = [threading.Thread(target=go, args=(k,)) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print("usage", outs[0]["usage"])
p = ps()
print("after", p["size"], p["kv_cache"])
PY
grep VmRSS "/proc/$PID/status"
