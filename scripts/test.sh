#!/usr/bin/env bash
# capy's full test suite: builds capy, pulls the two real models the golden tests use into
# the store (a no-op when they are there), runs every test in release mode, then the
# end-to-end server tests with the official openai and ollama Python clients (installed
# into a virtual environment under target/), and prints a one-line total.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release -p capy
for m in smollm2-135m gemma3-270m; do
  ./target/release/capy pull "$m"
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --workspace --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
venv=target/e2e-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import jsonschema" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "openai==3.54.0" "ollama==0.6.3" \
    "jsonschema==4.23.0"
fi
CAPY_BIN=target/release/capy "$venv/bin/python" -W ignore::ResourceWarning tests/e2e/test_server.py 2>&1 | tee -a "$log"
# structured outputs: JSON schemas, grammars and tools through both clients
CAPY_BIN=target/release/capy "$venv/bin/python" -W ignore::ResourceWarning tests/e2e/test_structured.py 2>&1 | tee -a "$log"
# virtual models: routers and ensembles through both clients
CAPY_BIN=target/release/capy "$venv/bin/python" -W ignore::ResourceWarning tests/e2e/test_virtual.py 2>&1 | tee -a "$log"
# the gateway: keys, limits, usage records, replicas on PostgreSQL behind nginx
CAPY_BIN=target/release/capy "$venv/bin/python" -W ignore::ResourceWarning tests/e2e/test_gateway.py 2>&1 | tee -a "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f; if (p == 0 || f > 0) exit 1 }' "$log"
