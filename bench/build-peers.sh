#!/usr/bin/env bash
# Builds llama-bench and llama-perplexity (and llama.cpp's llama-server for
# bench/vs-server.sh) of the two reference engines from their PyPI source packages, into a
# cache outside the repository ($CAPY_PEERS_DIR, default ~/.cache/capy-peers). Nothing of
# the engines' code enters the repository.
#   llama.cpp b11312 (commit 0c1e57098): llama-cpp-python==0.3.36, vendor/llama.cpp
#   ik_llama.cpp:                       ik-llama-cpp-python==0.1.5, vendor/ik_llama.cpp
#
# Three builds:
#   $PEERS/llama.cpp       llama.cpp with every x86 feature this CPU has, named one by one
#                          (never -march=native: some VMs advertise AMX and fault on it, so
#                          AMX stays off), the best llama.cpp for this machine
#   $PEERS/llama.cpp-avx2  llama.cpp for AVX2-only CPUs (AVX2, FMA, F16C, BMI2; no AVX-512,
#                          no VNNI), the peer of `CAPY_ISA=avx2`
#   $PEERS/ik_llama.cpp    ik_llama.cpp with -march=native (it has no AMX code)
# Where this CPU's features are exactly the AVX2 set, the first is a copy of the second.
set -euo pipefail
PEERS="${CAPY_PEERS_DIR:-$HOME/.cache/capy-peers}"
mkdir -p "$PEERS"
command -v cmake >/dev/null || { apt-get update -q && apt-get install -y -q cmake; }

fetch() { # package==version -> unpacked source dir
  local spec="$1" dir="$PEERS/src-${1//[=]/-}"
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir.tmp"
    # --no-binary for this package only (":all:" would build cmake from source too)
    python3 -m pip download -q --no-deps --no-binary "${spec%%==*}" -d "$dir.tmp" "$spec"
    tar -xzf "$dir.tmp"/*.tar.gz -C "$dir.tmp"
    mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# ggml's x86 feature options for the features /proc/cpuinfo lists (AMX always off)
native_flags() {
  local f
  f=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { [[ "$f" == *" $1 "* ]]; }
  local out=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  on() { if has "$1"; then out+=("-D$2=ON"); else out+=("-D$2=OFF"); fi; }
  on sse4_2 GGML_SSE42
  on avx GGML_AVX
  on avx2 GGML_AVX2
  on bmi2 GGML_BMI2
  on fma GGML_FMA
  on f16c GGML_F16C
  on avx_vnni GGML_AVX_VNNI
  on avx512f GGML_AVX512
  on avx512_vbmi GGML_AVX512_VBMI
  on avx512_vnni GGML_AVX512_VNNI
  on avx512_bf16 GGML_AVX512_BF16
  echo "${out[@]}"
}
AVX2_FLAGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
  -DGGML_AVX512_BF16=OFF"
NATIVE_FLAGS=$(native_flags)

build() { # tree name targets cmake-args...
  local tree="$1" name="$2" targets="$3"; shift 3
  local out="$PEERS/$name" dir="$tree/build-$name"
  if [ -x "$out/bin/llama-bench" ]; then return; fi
  # shellcheck disable=SC2086
  cmake -S "$tree" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF "$@" >/dev/null
  # shellcheck disable=SC2086
  cmake --build "$dir" -j2 --target $targets >/dev/null
  mkdir -p "$out.tmp"
  rm -rf "$out.tmp/bin"
  cp -r "$dir/bin" "$out.tmp/bin"
  rm -rf "$out"
  mv "$out.tmp" "$out"
  "$out/bin/llama-bench" --help >/dev/null 2>&1 || { echo "$name: llama-bench does not run" >&2; exit 1; }
}

same_set() { [ "$(tr -s ' \n' '\n\n' <<<"$1" | sort)" = "$(tr -s ' \n' '\n\n' <<<"$2" | sort)" ]; }

src=$(fetch llama-cpp-python==0.3.36)
tree=$(find "$src" -maxdepth 3 -type d -path '*vendor/llama.cpp' | head -1)
LLAMA_UI="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF"
# shellcheck disable=SC2086
build "$tree" llama.cpp-avx2 "llama-bench llama-perplexity llama-quantize" $LLAMA_UI $AVX2_FLAGS
if same_set "$NATIVE_FLAGS" "$AVX2_FLAGS"; then
  [ -x "$PEERS/llama.cpp/bin/llama-bench" ] || cp -r "$PEERS/llama.cpp-avx2" "$PEERS/llama.cpp"
else
  # shellcheck disable=SC2086
  build "$tree" llama.cpp "llama-bench llama-perplexity llama-quantize" $LLAMA_UI $NATIVE_FLAGS
fi
if [ ! -x "$PEERS/llama.cpp/bin/llama-server" ]; then
  dir="$tree/build-llama.cpp"
  same_set "$NATIVE_FLAGS" "$AVX2_FLAGS" && dir="$tree/build-llama.cpp-avx2"
  cmake --build "$dir" -j2 --target llama-server >/dev/null
  cp -P "$dir/bin/llama-server" "$dir"/bin/*.so* "$PEERS/llama.cpp/bin/" 2>/dev/null ||
    cp -P "$dir/bin/llama-server" "$PEERS/llama.cpp/bin/"
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
# shellcheck disable=SC2086
build "$tree" ik_llama.cpp "llama-bench llama-perplexity llama-quantize" -DGGML_NATIVE=ON

echo "$PEERS/llama.cpp/bin/llama-bench"
echo "$PEERS/llama.cpp-avx2/bin/llama-bench"
echo "$PEERS/llama.cpp/bin/llama-server"
echo "$PEERS/ik_llama.cpp/bin/llama-bench"
