#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers (capy serve, llama-server).

Sends `--requests` streaming /v1/completions requests, `--concurrency` at a time, each
asking for exactly `--tokens` tokens (ignore_eos), with prompts of about `--prompt-tokens`
tokens if given (distinct from their first words, sized with the server's /tokenize), and
reports the requests that completed with the right counts, aggregate generation
throughput, time to first token and inter-token latency percentiles. One JSON line per
run with --json. Uses only the standard library (asyncio + raw HTTP/1.1), so it measures
the servers and not a client library.

    python3 bench/serve-load.py --url http://127.0.0.1:11434 --model smollm2-135m -c 16
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlparse

sys.path.insert(0, __import__("os").path.dirname(__file__))
from benchhttp import body_chunks, n_tokens, percentile, post, sse_events  # noqa: E402

TOPICS = [
    "a lighthouse keeper", "the history of tea", "a robot learning to paint", "volcanoes",
    "a small town bakery", "the migration of birds", "a chess tournament", "deep sea fish",
    "an old clockmaker", "the first day of school", "a mountain rescue", "honey bees",
    "a jazz musician", "the northern lights", "a lost letter", "ancient libraries",
    "a train journey", "coral reefs", "a village festival", "the invention of paper",
]


async def one_request(host, port, model, prompt, tokens, temperature=0.0):
    """Returns (ttft_s, [inter-token gaps], n_tokens, total_s): tokens as the usage
    reports them (chunks with text otherwise)."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": temperature,
        "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    status, reader, writer, chunked = await post(host, port, "/v1/completions", body)
    if " 200 " not in status + " ":
        rest = b"".join([c async for c in body_chunks(reader, chunked)])
        writer.close()
        raise RuntimeError(f"{status}: {rest[-300:]!r}")
    stamps = []
    n_usage = None
    n_prompt = None
    async for now, obj in sse_events(reader, chunked):
        if obj.get("usage"):
            n_usage = obj["usage"].get("completion_tokens")
            n_prompt = obj["usage"].get("prompt_tokens")
        for ch in obj.get("choices") or []:
            if ch.get("text"):
                stamps.append(now)
    writer.close()
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    ttft = (stamps[0] - t0) if stamps else float("nan")
    return ttft, gaps, n_usage if n_usage is not None else len(stamps), total, n_prompt


async def padded(host, port, text, target):
    """`text` followed by numbered filler sentences, to about `target` tokens."""
    def filler(n):
        return [f"Detail {i}: {TOPICS[(i * 7) % len(TOPICS)]} and "
                f"{TOPICS[(i * 3 + 1) % len(TOPICS)]} meet on day {i}." for i in range(1, n + 1)]
    base = await n_tokens(host, port, text)
    per_line = (await n_tokens(host, port, "\n".join([text] + filler(20))) - base) / 20
    n = max(0, int((target - base) / per_line))
    # a few steps to the largest count that stays within the target
    while n > 0 and await n_tokens(host, port, "\n".join([text] + filler(n))) > target:
        n -= 1
    while await n_tokens(host, port, "\n".join([text] + filler(n + 1))) <= target:
        n += 1
    out = "\n".join([text] + filler(n)) + "\n"
    # then single words up to the target
    words = 0
    while await n_tokens(host, port, out + " word" * (words + 1)) <= target:
        words += 1
    return out + " word" * words


async def run(args):
    u = urlparse(args.url)
    host, port = u.hostname, u.port or 80
    prompts = [f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})."
               for i in range(args.requests)]
    if args.prompt_tokens:
        prompts = [await padded(host, port, p, args.prompt_tokens) for p in prompts]
    sem = asyncio.Semaphore(args.concurrency)
    results = []

    async def worker(p):
        async with sem:
            results.append(await one_request(host, port, args.model, p, args.tokens,
                                              args.temperature))

    # one warm-up request (loads the model, fills caches)
    await one_request(host, port, args.model, "Hello", 4)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(p) for p in prompts))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    n_tok = sum(r[2] for r in results)
    complete = sum(1 for r in results if r[2] == args.tokens)
    prompt_tokens = [r[4] for r in results if r[4] is not None]
    return {
        "label": args.label, "concurrency": args.concurrency, "temperature": args.temperature, "requests": args.requests,
        "tokens_per_request": args.tokens, "complete": complete, "tokens": n_tok,
        "prompt_tokens_min": min(prompt_tokens, default=None),
        "prompt_tokens_max": max(prompt_tokens, default=None),
        "wall_s": round(wall, 3), "agg_tok_s": round(n_tok / wall, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 1),
        "ttft_p90_ms": round(percentile(ttfts, 90) * 1e3, 1),
        "itl_p50_ms": round(percentile(gaps, 50) * 1e3, 2),
        "itl_p90_ms": round(percentile(gaps, 90) * 1e3, 2),
        "itl_p99_ms": round(percentile(gaps, 99) * 1e3, 2),
        "itl_mean_ms": round(statistics.fmean(gaps) * 1e3, 2) if gaps else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:11434")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-n", "--requests", type=int, default=None,
                    help="requests in all (default: 2 x concurrency)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="pad each prompt to about this many tokens")
    ap.add_argument("-T", "--temperature", type=float, default=0.0,
                    help="0 = greedy; above, each server's default top-k/top-p/min-p apply")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.requests = args.requests or 2 * args.concurrency
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:>20}: {v}")
    if r["complete"] != r["requests"]:
        print(f"error: {r['requests'] - r['complete']} requests did not complete", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
