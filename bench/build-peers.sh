#!/usr/bin/env bash
# Builds llama-bench (and llama-perplexity; llama-server of llama.cpp for
# bench/vs-server.sh) of the two reference engines from their PyPI
# source packages, into a cache outside the repository ($CAPY_PEERS_DIR, default
# ~/.cache/capy-peers). Nothing of the engines' code enters the repository.
#   llama.cpp b11312 (commit 0c1e57098): llama-cpp-python==0.3.36, vendor/llama.cpp
#   ik_llama.cpp:                       ik-llama-cpp-python==0.1.5, vendor/ik_llama.cpp
set -euo pipefail
PEERS="${CAPY_PEERS_DIR:-$HOME/.cache/capy-peers}"
mkdir -p "$PEERS"
command -v cmake >/dev/null || { apt-get update -q && apt-get install -y -q cmake; }

fetch() { # package==version -> unpacked source dir
  local spec="$1" dir="$PEERS/src-${1//[=]/-}"
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir.tmp"
    python3 -m pip download -q --no-deps --no-binary :all: -d "$dir.tmp" "$spec"
    tar -xzf "$dir.tmp"/*.tar.gz -C "$dir.tmp"
    mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

build() { # tree name extra-cmake-args...
  local tree="$1" name="$2"; shift 2
  local out="$PEERS/$name"
  if [ -x "$out/bin/llama-bench" ]; then return; fi
  cmake -S "$tree" -B "$tree/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "$@" >/dev/null
  cmake --build "$tree/build" -j2 --target llama-bench llama-perplexity >/dev/null
  mkdir -p "$out"
  rm -rf "$out/bin"
  cp -r "$tree/build/bin" "$out/bin"
}

src=$(fetch llama-cpp-python==0.3.36)
tree=$(find "$src" -maxdepth 3 -type d -path '*vendor/llama.cpp' | head -1)
build "$tree" llama.cpp -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF
if [ ! -x "$PEERS/llama.cpp/bin/llama-server" ]; then
  cmake --build "$tree/build" -j2 --target llama-server >/dev/null
  cp -P "$tree/build/bin/llama-server" "$tree"/build/bin/*.so* "$PEERS/llama.cpp/bin/"
fi

src=$(fetch ik-llama-cpp-python==0.1.5)
tree=$(find "$src" -maxdepth 3 -type d -path '*vendor/ik_llama.cpp' | head -1)
# the sdist lacks the build-info generator; a minimal one fills in the template
gen="$tree/common/cmake/build-info-gen-cpp.cmake"
mkdir -p "$(dirname "$gen")"
cat > "$gen" <<'CMAKE'
set(BUILD_NUMBER 0)
set(BUILD_COMMIT "ik-llama-cpp-python-0.1.5")
set(BUILD_COMPILER "${CMAKE_C_COMPILER_ID} ${CMAKE_C_COMPILER_VERSION}")
set(BUILD_TARGET "${CMAKE_SYSTEM_PROCESSOR}")
configure_file("${CMAKE_CURRENT_LIST_DIR}/../build-info.cpp.in" "${CMAKE_CURRENT_LIST_DIR}/../build-info.cpp")
CMAKE
build "$tree" ik_llama.cpp

echo "$PEERS/llama.cpp/bin/llama-bench"
echo "$PEERS/llama.cpp/bin/llama-server"
echo "$PEERS/ik_llama.cpp/bin/llama-bench"
