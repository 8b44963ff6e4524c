"""Speculative decoding, side by side: capy with and without speculation, and llama.cpp's
llama-server with and without it, on the same target/draft pair, one stream, interleaved.

  python3 bench/speculative.py pair   --target T.gguf --draft D.gguf [--temps 0,0.7]
  python3 bench/speculative.py ngram  --target T.gguf      # "rewrite this code" prompt
  python3 bench/speculative.py load   --target T.gguf --draft D.gguf [--streams 16]

`pair`: for each golden prompt (plain completion) and temperature, every server generates
`-n` tokens (ignore_eos), one request at a time, rotating through the servers so drift hits
all alike; tokens/s is completion tokens over the request's wall time (the prompts are a few
tokens). `ngram`: a chat asking to rewrite a ~600-token function with one change, with
n-gram (prompt lookup) speculation. `load`: `--streams` concurrent streams, aggregate
tokens/s with speculation configured and without. Acceptance comes from capy's /metrics and
llama-server's `timings` (`draft_n`, `draft_n_accepted`).
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import benchhttp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.expanduser("~/.cache/capy-peers/llama.cpp/bin")

CODE = '''def summarize_orders(orders, tax_rate=0.2, currency="EUR", min_total=0.0):
    """Group orders by customer and compute totals, taxes and item counts."""
    customers = {}
    for order in orders:
        customer = order.get("customer")
        if customer is None:
            continue
        items = order.get("items", [])
        subtotal = 0.0
        count = 0
        for item in items:
            price = float(item.get("price", 0.0))
            quantity = int(item.get("quantity", 1))
            if quantity <= 0:
                continue
            subtotal += price * quantity
            count += quantity
        discount = order.get("discount", 0.0)
        if discount:
            subtotal = subtotal * (1.0 - discount)
        tax = subtotal * tax_rate
        total = subtotal + tax
        if total < min_total:
            continue
        entry = customers.setdefault(customer, {
            "orders": 0,
            "items": 0,
            "subtotal": 0.0,
            "tax": 0.0,
            "total": 0.0,
            "currency": currency,
        })
        entry["orders"] += 1
        entry["items"] += count
        entry["subtotal"] += subtotal
        entry["tax"] += tax
        entry["total"] += total
    report = []
    for customer, entry in sorted(customers.items()):
        average = entry["total"] / entry["orders"] if entry["orders"] else 0.0
        report.append({
            "customer": customer,
            "orders": entry["orders"],
            "items": entry["items"],
            "subtotal": round(entry["subtotal"], 2),
            "tax": round(entry["tax"], 2),
            "total": round(entry["total"], 2),
            "average": round(average, 2),
            "currency": entry["currency"],
        })
    report.sort(key=lambda r: r["total"], reverse=True)
    return report
'''


def post(port, path, body, timeout=900):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        d = json.load(r)
    return d, time.perf_counter() - t0


def wait_ready(port, proc, what):
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"{what} exited: see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    sys.exit(f"{what} did not become ready")


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("capy_speculative_"):
            k, v = line.split()
            out[k] = float(v)
    return out


class Server:
    def __init__(self, name, engine, port, cmd, env=None):
        self.name, self.engine, self.port = name, engine, port
        self.log = open(f"/tmp/spec-bench-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.speeds, self.drafted, self.accepted = [], 0, 0

    def ready(self):
        wait_ready(self.port, self.proc, self.name)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def capy(name, port, target, threads, extra=()):
    cmd = [os.path.join(ROOT, "target/release/capy"), "serve", "-m", target, "--port",
           str(port), "-t", str(threads), "-c", "2048", "--parallel", "16", *extra]
    return Server(name, "capy", port, cmd)


def llama(name, port, target, threads, extra=()):
    cmd = [os.path.join(PEERS, "llama-server"), "-m", target, "--port", str(port), "-t",
           str(threads), "-c", "4096", "--no-webui", *extra]
    return Server(name, "llama", port, cmd, {"LD_LIBRARY_PATH": PEERS})


def completion(s, prompt, n, temp, chat=False):
    """One request; returns (tokens, seconds, drafted, accepted)."""
    before = metrics(s.port) if s.engine == "capy" else None
    model = s.model
    if chat:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": n, "temperature": temp, "seed": 7}
        d, dt = post(s.port, "/v1/chat/completions", body)
    else:
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": temp,
                "seed": 7, "ignore_eos": True}
        d, dt = post(s.port, "/v1/completions", body)
    toks = d["usage"]["completion_tokens"]
    if s.engine == "capy":
        after = metrics(s.port)
        dr = after.get("capy_speculative_drafted_tokens_total", 0) - before.get(
            "capy_speculative_drafted_tokens_total", 0)
        ac = after.get("capy_speculative_accepted_tokens_total", 0) - before.get(
            "capy_speculative_accepted_tokens_total", 0)
    else:
        t = d.get("timings", {})
        dr, ac = t.get("draft_n", 0), t.get("draft_n_accepted", 0)
    return toks, dt, dr, ac


def served_name(s):
    with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def report(servers, label):
    print(f"\n{label}")
    print("| server | tok/s (mean) | vs same engine, no speculation | acceptance |")
    print("|---|---|---|---|")
    base = {}
    for s in servers:
        mean = sum(s.speeds) / len(s.speeds)
        base.setdefault(s.engine, mean)
        acc = f"{100 * s.accepted / s.drafted:.1f}% of {s.drafted:.0f}" if s.drafted else "-"
        print(f"| {s.name} | {mean:.2f} | {mean / base[s.engine]:.2f}x | {acc} |")


def run_rotation(servers, jobs, n, temp, chat=False):
    for s in servers:
        s.speeds, s.drafted, s.accepted = [], 0, 0
    for i, prompt in enumerate(jobs):
        order = servers[i % len(servers):] + servers[:i % len(servers)]
        for s in order:
            toks, dt, dr, ac = completion(s, prompt, n, temp, chat)
            s.speeds.append(toks / dt)
            s.drafted += dr
            s.accepted += ac


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pair", "ngram", "load"])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft")
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--temps", default="0,0.7")
    ap.add_argument("--prompts", type=int, default=8, help="golden prompts used")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--reps", type=int, default=4, help="load: rounds")
    a = ap.parse_args()
    golden = json.load(open(os.path.join(ROOT, "../shared/golden/SmolLM2-135M-Instruct.Q4_1.json")))
    prompts = [c["prompt"] for c in golden["completions"]][:a.prompts]
    t = a.threads
    dm = str(a.draft_max)
    if a.mode == "pair":
        servers = [capy("capy", 18101, a.target, t),
                   capy("capy+draft", 18102, a.target, t, ["-md", a.draft, "--draft-max", dm]),
                   capy("capy+draft(p-min 0.5)", 18106, a.target, t,
                        ["-md", a.draft, "--draft-max", dm, "--draft-p-min", "0.5"])]
        if not a.no_llama:
            servers += [
                llama("llama.cpp", 18103, a.target, t),
                llama("llama.cpp+draft", 18104, a.target, t,
                      ["-md", a.draft, "--spec-type", "draft-simple", "--spec-draft-n-max", dm]),
                llama("llama.cpp+draft(defaults)", 18105, a.target, t,
                      ["-md", a.draft, "--spec-type", "draft-simple"])]
    elif a.mode == "ngram":
        servers = [capy("capy", 18101, a.target, t),
                   capy("capy+ngram", 18102, a.target, t, ["--spec-type", "ngram", "--draft-max", dm])]
        if not a.no_llama:
            servers += [llama("llama.cpp", 18103, a.target, t),
                        llama("llama.cpp+ngram", 18104, a.target, t,
                              ["--spec-type", "ngram-simple", "--spec-draft-n-max", dm])]
    else:
        servers = [capy("capy", 18101, a.target, t),
                   capy("capy+draft", 18102, a.target, t, ["-md", a.draft, "--draft-max", dm]),
                   capy("capy+ngram", 18103, a.target, t, ["--spec-type", "ngram"])]
    try:
        for s in servers:
            s.ready()
        for s in servers:
            s.model = served_name(s)
        if a.mode == "pair":
            for temp in [float(x) for x in a.temps.split(",")]:
                run_rotation(servers, prompts, a.n, temp)
                report(servers, f"target {os.path.basename(a.target)}, draft "
                       f"{os.path.basename(a.draft)}, {len(prompts)} golden prompts x {a.n} "
                       f"tokens, temperature {temp}, {t} threads")
        elif a.mode == "ngram":
            ask = ("Rewrite this Python function with one change: rename the variable "
                   "`subtotal` to `net`. Reply with the whole function only.\n\n```python\n"
                   + CODE + "```")
            run_rotation(servers, [ask] * 3, a.n, 0.0, chat=True)
            report(servers, f"n-gram, 'rewrite this code' (~600-token function), "
                   f"{os.path.basename(a.target)}, temperature 0, {t} threads")
        else:
            print(f"\n{a.streams} concurrent streams of {a.n} tokens, "
                  f"{os.path.basename(a.target)}, {t} threads")
            print("| server | aggregate tok/s | vs no speculation | drafted |")
            print("|---|---|---|---|")
            ratios = {}
            for rep in range(a.reps):
                base = None
                for s in servers:
                    before = metrics(s.port)
                    t0 = time.perf_counter()
                    toks = asyncio.run(load(s.port, s.model, prompts, a.streams, a.n))
                    dt = time.perf_counter() - t0
                    after = metrics(s.port)
                    rate = toks / dt
                    base = base or rate
                    dr = after.get("capy_speculative_drafted_tokens_total", 0) - before.get(
                        "capy_speculative_drafted_tokens_total", 0)
                    ratios.setdefault(s.name, []).append(rate / base)
                    print(f"| {s.name} (run {rep + 1}) | {rate:.1f} | {rate / base:.3f}x | {dr:.0f} |")
            for name, r in ratios.items():
                print(f"| {name}, mean of {len(r)} | | {sum(r) / len(r):.3f}x | |")
    finally:
        for s in servers:
            s.stop()


async def load(port, model, prompts, streams, n):
    async def one(i):
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": n,
                "temperature": 0.7, "seed": i, "ignore_eos": True}
        status, reader, writer, chunked = await benchhttp.post("127.0.0.1", port, "/v1/completions", body)
        data = b""
        async for c in benchhttp.body_chunks(reader, chunked):
            data += c
        writer.close()
        return json.loads(data)["usage"]["completion_tokens"]
    return sum(await asyncio.gather(*(one(i) for i in range(streams))))


if __name__ == "__main__":
    main()
