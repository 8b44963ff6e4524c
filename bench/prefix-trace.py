#!/usr/bin/env python3
"""Multi-turn chat trace for prefix caching (capy serve, llama-server).

`--clients` conversations run at once, each `--turns` turns long, every one starting with the
same system prompt of about `--system-tokens` tokens (sized with the server's /tokenize).
Each turn sends the whole conversation so far (system prompt, earlier questions and the
server's own answers) plus a new question to /v1/chat/completions (streaming, greedy,
`--answer` tokens, ignore_eos), so a server with a prefix cache computes only the new part.
Clients start `--stagger` seconds apart and go on as soon as an answer ends.

Reports time to first token (p50/p90) of turn 1 and of turns 2.., prompt tokens, and the
prompt tokens the server says came from its cache (`usage.prompt_tokens_details.
cached_tokens`, or llama-server's `timings.cache_n`). One JSON line with --json. Standard
library only.

    python3 bench/prefix-trace.py --url http://127.0.0.1:11434 --model smollm2-135m
"""

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlparse

sys.path.insert(0, __import__("os").path.dirname(__file__))
from benchhttp import body_chunks, n_tokens, percentile, post, sse_events  # noqa: E402

WORDS = ("river stone lantern orchard harbor meadow copper signal garden winter "
         "compass ledger timber canyon feather marble violet thunder saddle quarry").split()


async def system_prompt(host, port, target):
    """A system prompt of about `target` tokens: numbered rules of varied words."""
    lines = ["You are the archivist of a large library. Follow these house rules."]
    i = 0
    while True:
        text = "\n".join(lines)
        if await n_tokens(host, port, text) >= target:
            return text
        for _ in range(8):
            i += 1
            w = [WORDS[(i * k + k) % len(WORDS)] for k in range(1, 7)]
            lines.append(f"Rule {i}: when asked about the {w[0]} {w[1]}, mention the {w[2]} "
                         f"and the {w[3]}, never the {w[4]} or the {w[5]}.")


async def turn(host, port, model, messages, answer):
    """One streamed chat turn: (ttft_s, answer text, prompt tokens, cached tokens)."""
    body = {"model": model, "messages": messages, "max_tokens": answer, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    status, reader, writer, chunked = await post(host, port, "/v1/chat/completions", body)
    if " 200 " not in status + " ":
        rest = b"".join([c async for c in body_chunks(reader, chunked)])
        writer.close()
        raise RuntimeError(f"{status}: {rest[-300:]!r}")
    text, ttft, prompt, cached = [], None, None, None
    async for now, obj in sse_events(reader, chunked):
        for ch in obj.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content")
            if piece:
                if ttft is None:
                    ttft = now - t0
                text.append(piece)
        usage = obj.get("usage")
        if usage:
            prompt = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens", cached)
        timings = obj.get("timings")
        if timings and "cache_n" in timings:
            cached = timings["cache_n"]
    writer.close()
    return ttft, "".join(text), prompt, cached


async def run(args):
    u = urlparse(args.url)
    host, port = u.hostname, u.port or 80
    system = await system_prompt(host, port, args.system_tokens)
    # warm-up: loads the model (not the system prompt: every conversation's first turn
    # finds what the others computed, as in a real deployment)
    await turn(host, port, args.model, [{"role": "user", "content": "Hello"}], 4)
    rows = []

    async def client(c):
        await asyncio.sleep(c * args.stagger)
        messages = [{"role": "system", "content": system}]
        for t in range(args.turns):
            w = [WORDS[(c * 7 + t * 3 + k) % len(WORDS)] for k in range(4)]
            messages.append({"role": "user", "content":
                             f"Visitor {c}, question {t + 1}: what do the rules say about the "
                             f"{w[0]} {w[1]}, and how does that relate to the {w[2]} "
                             f"{w[3]}? Answer in two sentences."})
            ttft, text, prompt, cached = await turn(host, port, args.model, messages,
                                                    args.answer)
            rows.append({"client": c, "turn": t + 1, "ttft": ttft, "prompt": prompt,
                         "cached": cached})
            messages.append({"role": "assistant", "content": text})

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(args.clients)))
    wall = time.perf_counter() - t0
    first = [r["ttft"] for r in rows if r["turn"] == 1 and r["ttft"] is not None]
    later = [r["ttft"] for r in rows if r["turn"] > 1 and r["ttft"] is not None]
    prompt = sum(r["prompt"] or 0 for r in rows)
    known = [r for r in rows if r["cached"] is not None]
    cached = sum(r["cached"] for r in known)
    return {
        "label": args.label, "clients": args.clients, "turns": args.turns,
        "system_tokens": await n_tokens(host, port, system), "answer_tokens": args.answer,
        "requests": len(rows), "wall_s": round(wall, 2),
        "prompt_tokens": prompt,
        "cached_tokens": cached if known else None,
        "cached_share": round(cached / prompt, 4) if known and prompt else None,
        "ttft_turn1_p50_ms": round(percentile(first, 50) * 1e3, 1),
        "ttft_turn1_p90_ms": round(percentile(first, 90) * 1e3, 1),
        "ttft_later_p50_ms": round(percentile(later, 50) * 1e3, 1),
        "ttft_later_p90_ms": round(percentile(later, 90) * 1e3, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:11434")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--answer", type=int, default=48, help="tokens per answer")
    ap.add_argument("--stagger", type=float, default=0.5,
                    help="seconds between the starts of two clients")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:>20}: {v}")
    if r["requests"] != args.clients * args.turns:
        print("error: some turns did not complete", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
