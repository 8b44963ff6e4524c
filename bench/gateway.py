"""What the gateway costs: 16-stream aggregate tokens/s with API keys, limits and usage
records on, against the same server with no gateway at all (`--auth off --no-usage`),
in interleaved rounds; and the time the gateway's own checks take per request (p50/p99
from the server's `capy_gateway_check_seconds` histogram, and the client-side latency of a
cheap route with and without a key).

    target/e2e-venv/bin/python bench/gateway.py [--model smollm2-135m] [--rounds 3]
        [--seconds 20] [--streams 16] [--max-tokens 96]

Both servers run at once (the idle one costs nothing); each round measures one, then the
other. Prints a table and the ratio; `--json` for a line of JSON.
"""

import argparse
import concurrent.futures
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPY = os.environ.get("CAPY_BIN", os.path.join(ROOT, "target", "release", "capy"))

TOPICS = ["rivers", "mountains", "the moon", "bread", "trains", "music", "bees", "winter",
          "the sea", "libraries", "gardens", "clocks", "bicycles", "storms", "owls", "salt"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, extra, db):
    port = free_port()
    cmd = [CAPY, "serve", "--port", str(port), "-m", args.model, "--parallel",
           str(args.streams), "-c", "2048", "--database-url", db, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def load(url, key, args):
    """16 streams for `seconds`: completion tokens per second, all streams together."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0)
    stop = time.time() + args.seconds

    def stream(i):
        n, j = 0, 0
        while time.time() < stop:
            topic = TOPICS[(i + j) % len(TOPICS)]
            s = client.chat.completions.create(
                model=args.model, max_tokens=args.max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"Write a long essay about {topic}."}])
            for ch in s:
                if ch.usage:
                    n += ch.usage.completion_tokens
            j += 1
        return n

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
        total = sum(pool.map(stream, range(args.streams)))
    return total / (time.time() - t0)


def route_latency(url, key, n=1000):
    """Client-side latencies (ms) of GET /v1/models, one request at a time."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = []
    for _ in range(n):
        req = urllib.request.Request(url + "/v1/models", headers=headers)
        t = time.perf_counter()
        with urllib.request.urlopen(req) as r:
            r.read()
        out.append((time.perf_counter() - t) * 1e3)
    out.sort()
    return out[len(out) // 2], out[int(len(out) * 0.99)]


def check_quantiles(url, key):
    """p50 and p99 upper bounds (ms) of the gateway's check time, from its histogram."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req) as r:
        text = r.read().decode()
    buckets = [(float(le), int(n)) for le, n in
               re.findall(r'^capy_gateway_check_seconds_bucket\{le="([0-9.e-]+)"\} (\d+)$',
                          text, re.M)]
    total = int(re.search(r"^capy_gateway_check_seconds_count (\d+)$", text, re.M).group(1))

    def q(p):
        for le, n in buckets:
            if n >= p * total:
                return le * 1e3
        return float("inf")

    return q(0.5), q(0.99), total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--aa", action="store_true",
                    help="control run: both servers without the gateway (the noise floor "
                         "and any bias of which server started first)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="capy-bench-gw-")
    gated_db = f"sqlite://{tmp}/gated.db"
    key = subprocess.run([CAPY, "keys", "create", "bench", "--rpm", "100000", "--tpm",
                          "100000000", "--tokens-per-day", "1000000000", "--max-concurrent",
                          "1000", "--database-url", gated_db], check=True,
                         capture_output=True, text=True).stdout.strip()
    admin = subprocess.run([CAPY, "keys", "create", "admin", "--admin", "--database-url",
                            gated_db], check=True, capture_output=True, text=True).stdout.strip()
    if args.aa:
        gated, gated_url = start(args, ["--auth", "off", "--no-usage"], gated_db)
        key = None
    else:
        gated, gated_url = start(args, [], gated_db)
    plain, plain_url = start(args, ["--auth", "off", "--no-usage"], f"sqlite://{tmp}/plain.db")
    try:
        load(gated_url, key, argparse.Namespace(**{**vars(args), "seconds": 3}))  # warm up
        load(plain_url, None, argparse.Namespace(**{**vars(args), "seconds": 3}))
        rows = []
        for r in range(args.rounds):
            order = [("gated", gated_url, key), ("plain", plain_url, None)]
            if r % 2:
                order.reverse()
            res = {name: load(url, k, args) for name, url, k in order}
            rows.append(res)
            print(f"round {r + 1}: with gateway {res['gated']:.1f} tok/s, "
                  f"without {res['plain']:.1f} tok/s, ratio {res['gated'] / res['plain']:.3f}",
                  file=sys.stderr)
        g = statistics.mean(x["gated"] for x in rows)
        p = statistics.mean(x["plain"] for x in rows)
        lat_g = route_latency(gated_url, key)
        lat_p = route_latency(plain_url, None)
        c50, c99, n = (0, 0, 0) if args.aa else check_quantiles(gated_url, admin)
        out = {
            "model": args.model, "streams": args.streams, "rounds": args.rounds,
            "tokens_per_s_gateway": round(g, 1), "tokens_per_s_plain": round(p, 1),
            "ratio": round(g / p, 3),
            "ratios": [round(x["gated"] / x["plain"], 3) for x in rows],
            "check_ms_p50_at_most": c50, "check_ms_p99_at_most": c99, "checked_requests": n,
            "models_route_ms_p50_p99_gateway": [round(x, 3) for x in lat_g],
            "models_route_ms_p50_p99_plain": [round(x, 3) for x in lat_p],
        }
        if args.json:
            print(json.dumps(out))
        else:
            print(f"16-stream tokens/s: gateway {g:.1f}, none {p:.1f}, ratio {g / p:.3f} "
                  f"(rounds {out['ratios']})")
            print(f"gateway checks per request ({n}): p50 <= {c50:.3f} ms, p99 <= {c99:.3f} ms")
            print(f"GET /v1/models p50/p99 ms: with key {lat_g[0]:.3f}/{lat_g[1]:.3f}, "
                  f"without {lat_p[0]:.3f}/{lat_p[1]:.3f}")
    finally:
        for proc in (gated, plain):
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
