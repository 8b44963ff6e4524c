"""What structured outputs cost: generation tokens/s with a JSON schema against the same
requests unconstrained, one stream and 16 at once, in interleaved rounds; and the time a
token mask takes (the server's `capy_grammar_mask_seconds` histogram: the share of masks
under 1 ms, and the bucket that holds the 50th and 99th percentiles).

    target/e2e-venv/bin/python bench/structured.py [--model smollm2-135m] [--rounds 3]
        [--requests 4] [--streams 16] [--max-tokens 128]

One stream: Ollama's /api/generate, whose eval_count / eval_duration is the generation
rate without the prompt. 16 streams: completion tokens of all streams over the wall time.
A warm-up request builds the vocabulary's token trie first (a one-time cost per model and
process, reported separately). `--json` prints one line of JSON.
"""

import argparse
import concurrent.futures
import json
import os
import re
import socket
import statistics
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPY = os.environ.get("CAPY_BIN", os.path.join(ROOT, "target", "release", "capy"))

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 30,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "city": {"type": "string", "maxLength": 40},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["engineer", "teacher", "farmer", "doctor", "artist"]},
                },
                "required": ["name", "city", "age", "role"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
PROMPTS = ["List thirty people with their name, city, age and role, as JSON.",
           "Write the staff list of a small town as JSON: name, city, age, role.",
           "Give a JSON list of people (name, city, age, role) living by the sea.",
           "Make up thirty characters for a novel as JSON with name, city, age and role."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def generate(url, model, prompt, constrained, max_tokens, seed):
    body = {"model": model, "prompt": prompt, "stream": False,
            "options": {"num_predict": max_tokens, "temperature": 0.7, "seed": seed}}
    if constrained:
        body["format"] = SCHEMA
    r = post(url + "/api/generate", body)
    if constrained:
        # the grammar guarantees a JSON prefix; a complete answer must parse
        if r.get("done_reason") == "stop":
            json.loads(r["response"])
    return r["eval_count"], r["eval_duration"] / 1e9


def single(url, args, constrained, rnd):
    n, secs = 0, 0.0
    for i in range(args.requests):
        c, s = generate(url, args.model, PROMPTS[i % len(PROMPTS)], constrained,
                        args.max_tokens, 1000 * rnd + i)
        n, secs = n + c, secs + s
    return n / secs


def many(url, args, constrained, rnd):
    def one(i):
        c, _ = generate(url, args.model, PROMPTS[i % len(PROMPTS)], constrained,
                        args.max_tokens, 1000 * rnd + i)
        return c
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
        total = sum(pool.map(one, range(args.streams)))
    return total / (time.time() - t0)


def mask_histogram(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    buckets = []
    for m in re.finditer(r'^capy_grammar_mask_seconds_bucket\{le="([^"]+)"\} (\d+)$', text, re.M):
        buckets.append((float(m.group(1)), int(m.group(2))))
    return buckets


def quantile_bucket(buckets, q):
    total = buckets[-1][1]
    for le, cum in buckets:
        if cum >= q * total:
            return le
    return float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    port = free_port()
    proc = subprocess.Popen([CAPY, "serve", "--port", str(port), "-m", args.model,
                             "--parallel", str(args.streams), "-c", str(args.streams * 512)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        # warm-up: loads the model; the first constrained request builds the token trie
        generate(url, args.model, PROMPTS[0], False, 8, 0)
        t0 = time.time()
        generate(url, args.model, PROMPTS[0], True, 1, 0)
        trie_s = time.time() - t0
        before = mask_histogram(url)
        rows = []
        for rnd in range(args.rounds):
            row = {}
            for constrained in (False, True) if rnd % 2 == 0 else (True, False):
                k = "schema" if constrained else "free"
                row[k + "_1"] = single(url, args, constrained, rnd)
                row[k + "_n"] = many(url, args, constrained, rnd)
            rows.append(row)
        after = mask_histogram(url)
    finally:
        proc.terminate()
        proc.wait()
    hist = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    total = hist[-1][1]
    under_1ms = next(c for le, c in hist if abs(le - 1e-3) < 1e-12) / max(total, 1)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out = {
        "model": args.model,
        "rounds": args.rounds,
        "tok_s": med,
        "ratio_1": med["schema_1"] / med["free_1"],
        "ratio_n": med["schema_n"] / med["free_n"],
        "per_round_ratio_1": [r["schema_1"] / r["free_1"] for r in rows],
        "per_round_ratio_n": [r["schema_n"] / r["free_n"] for r in rows],
        "masks": total,
        "masks_under_1ms": under_1ms,
        "mask_p50_le": quantile_bucket(hist, 0.5),
        "mask_p99_le": quantile_bucket(hist, 0.99),
        "first_request_s": trie_s,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"model {args.model}, {args.rounds} rounds, median tokens/s:")
    print(f"  1 stream:  free {med['free_1']:.1f}  schema {med['schema_1']:.1f}  "
          f"ratio {out['ratio_1']:.3f}  (rounds {', '.join(f'{x:.3f}' for x in out['per_round_ratio_1'])})")
    print(f"  {args.streams} streams: free {med['free_n']:.1f}  schema {med['schema_n']:.1f}  "
          f"ratio {out['ratio_n']:.3f}  (rounds {', '.join(f'{x:.3f}' for x in out['per_round_ratio_n'])})")
    print(f"  masks: {total}, under 1 ms: {100 * under_1ms:.2f}%, p50 <= {out['mask_p50_le'] * 1e3:g} ms, "
          f"p99 <= {out['mask_p99_le'] * 1e3:g} ms")
    print(f"  first constrained request (builds the token trie): {trie_s:.2f} s")


if __name__ == "__main__":
    main()
