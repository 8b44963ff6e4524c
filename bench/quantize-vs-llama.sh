#!/usr/bin/env bash
# capy quantize against llama-quantize (llama.cpp b11312, bench/build-peers.sh): SmolLM2 in
# F16 (made by capy from the store's Q4_1), quantized by both to each TYPE; the tensors are
# compared one by one (type and bytes), and llama-perplexity (GPL-3, -c 512) runs on both
# files, so a capy file is shown to load in llama.cpp with the same perplexity.
#   bash bench/quantize-vs-llama.sh [TYPE...]      (default: Q4_K_M Q8_0 Q4_0)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then types=("$@"); else types=(Q4_K_M Q8_0 Q4_0); fi
peers=${CAPY_PEERS:-$HOME/.cache/capy-peers}
src=$peers/src-llama-cpp-python--0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp
lq=${LLAMA_QUANTIZE:-$src/build-llama.cpp-avx2/bin/llama-quantize}
lp=$peers/llama.cpp/bin/llama-perplexity
export LD_LIBRARY_PATH=$peers/llama.cpp/bin
text=/usr/share/common-licenses/GPL-3
dir=${TMPDIR:-/tmp}/capy-quantize-vs-llama
mkdir -p "$dir"
capy=target/release/capy
$capy quantize smollm2-135m "$dir/f16.gguf" F16 --force
ppl() { "$lp" -m "$1" -f "$text" -c 512 -t 2 2>&1 | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'; }
printf '| type | tensors identical | llama-perplexity, llama-quantize file | llama-perplexity, capy file | difference |\n|---|---|---|---|---|\n'
for t in "${types[@]}"; do
  $capy quantize "$dir/f16.gguf" "$dir/capy-$t.gguf" "$t" --force 2>/dev/null
  "$lq" "$dir/f16.gguf" "$dir/llama-$t.gguf" "$t" 2 > "$dir/lq-$t.log" 2>&1
  same=$(python3 bench/gguf-compare.py "$dir/capy-$t.gguf" "$dir/llama-$t.gguf")
  a=$(ppl "$dir/llama-$t.gguf"); b=$(ppl "$dir/capy-$t.gguf")
  d=$(python3 -c "print(f'{100*abs($b-$a)/$a:.3f}%')")
  printf '| %s | %s | %s | %s | %s |\n' "$t" "$same" "$a" "$b" "$d"
done
