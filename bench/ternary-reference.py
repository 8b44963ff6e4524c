"""Writes tests/data/ternary-reference.json: llama.cpp b11312's log-probabilities on the tiny
synthetic ternary models that crates/engine/tests/ternary.rs builds, for its parity test.

For each of the test's models (bitnet with per-tensor scale tensors, llama with ternary
weights; `cargo run --release -p capy-model --example synthetic` with the test's shapes), in
TQ1_0 and TQ2_0 made by llama.cpp's own `llama-quantize`:
  - the FNV-1a 64 of every ternary tensor's bytes (capy's quantizer must write the same),
  - `llama-perplexity -f GPL-3 -c 128 --chunks 2 --kl-divergence-base`: the tokens and, at
    every scored position, the five likeliest tokens with their log-probabilities.

Usage: python3 bench/ternary-reference.py [LLAMA_BIN_DIR]
  (default ~/.cache/capy-peers/llama.cpp-avx2/bin, built by bench/build-peers.sh)
Needs the SmolLM2 model in the store (`capy pull smollm2-135m`) for the tokenizer.
Standard library only.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.cache/capy-peers/llama.cpp-avx2/bin")
VOCAB = os.path.expanduser(os.environ.get("CAPY_HOME", "~/.capy") + "/models/smollm2-135m.gguf")
TEXT = "/usr/share/common-licenses/GPL-3"
N_CTX, CHUNKS, TOP = 128, 2, 5
# the test's models: name -> synthetic example arguments (keep in step with ternary.rs)
SHAPE = ["--n-embd", "256", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2",
         "--n-ff", "512", "--ctx", "512"]
MODELS = {
    "bitnet": ["--arch", "bitnet"],
    "llama": ["--arch", "llama", "--no-scale-tensors"],
}
TYPES = {"TQ1_0": (34, 54), "TQ2_0": (35, 66)}


def fnv1a(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def ternary_tensors(path):
    """{name: bytes} of the TQ tensors of a GGUF file."""
    d = open(path, "rb").read()
    o = 8
    nt, nkv = struct.unpack_from("<QQ", d, o)
    o += 16
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    align = 32

    def string():
        nonlocal o
        (n,) = struct.unpack_from("<Q", d, o)
        o += 8
        s = d[o:o + n]
        o += n
        return s

    def skip(t):
        nonlocal o
        if t == 8:
            string()
        elif t == 9:
            et, n = struct.unpack_from("<IQ", d, o)
            o += 12
            for _ in range(n):
                skip(et)
        else:
            o += sizes[t]

    for _ in range(nkv):
        key = string()
        (t,) = struct.unpack_from("<I", d, o)
        o += 4
        if key == b"general.alignment":
            (align,) = struct.unpack_from("<I", d, o)
        skip(t)
    infos = []
    for _ in range(nt):
        name = string().decode()
        (nd,) = struct.unpack_from("<I", d, o)
        o += 4
        dims = struct.unpack_from("<%dQ" % nd, d, o)
        o += 8 * nd
        ty, off = struct.unpack_from("<IQ", d, o)
        o += 12
        infos.append((name, dims, ty, off))
    start = (o + align - 1) // align * align
    out = {}
    for name, dims, ty, off in infos:
        for tname, (tid, size) in TYPES.items():
            if ty == tid:
                n = 1
                for x in dims:
                    n *= x
                out[name] = d[start + off:start + off + n // 256 * size]
    return out


def read_kld(path):
    d = open(path, "rb").read()
    assert d[:8] == b"_logits_", path
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", d, 8)
    o = 20
    tokens = list(struct.unpack_from("<%di" % (n_chunk * n_ctx), d, o))
    o += 4 * n_chunk * n_ctx
    nv = 2 * ((n_vocab + 1) // 2) + 4
    steps = []
    for _ in range(n_chunk * (n_ctx - 1 - n_ctx // 2)):
        scale, min_lp = struct.unpack_from("<ff", d, o)
        codes = struct.unpack_from("<%dH" % n_vocab, d, o + 8)
        o += 2 * nv
        top = sorted(range(n_vocab), key=lambda i: -codes[i])[:TOP]
        steps.append([[i, round(scale * codes[i] + min_lp, 6)] for i in top])
    return n_ctx, tokens, steps


def main():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capy-model", "--example",
                    "synthetic"], cwd=ROOT, check=True)
    synth = os.path.join(ROOT, "target/release/examples/synthetic")
    out = {"source": (
        "llama.cpp b11312 (llama-cpp-python 0.3.36) llama-quantize and llama-perplexity "
        f"-f {TEXT} -c {N_CTX} --chunks {CHUNKS} -t 2 --kl-divergence-base; written by "
        "bench/ternary-reference.py"), "n_ctx": N_CTX, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in MODELS.items():
            f16 = os.path.join(tmp, f"{name}-f16.gguf")
            subprocess.run([synth, *args, *SHAPE, "--vocab-from", VOCAB, "--out", f16],
                           check=True, stdout=subprocess.DEVNULL)
            for ty in TYPES:
                q = os.path.join(tmp, f"{name}-{ty}.gguf")
                subprocess.run([f"{BIN}/llama-quantize", f16, q, ty, "2"], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                kld = os.path.join(tmp, f"{name}-{ty}.kld")
                subprocess.run([f"{BIN}/llama-perplexity", "-m", q, "-f", TEXT, "-c",
                                str(N_CTX), "--chunks", str(CHUNKS), "-t", "2",
                                "--kl-divergence-base", kld], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                n_ctx, tokens, steps = read_kld(kld)
                hashes = {k: "%016x" % fnv1a(v) for k, v in sorted(ternary_tensors(q).items())}
                out["models"][f"{name}-{ty}"] = {
                    "tensor_fnv1a": hashes, "tokens": tokens, "top5": steps}
                print(f"{name} {ty}: {len(hashes)} ternary tensors, {len(steps)} positions",
                      file=sys.stderr)
    path = os.path.join(ROOT, "tests/data/ternary-reference.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
