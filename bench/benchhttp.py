"""Shared pieces of the bench scripts: a minimal HTTP/1.1 client (asyncio, standard library
only, so they measure the servers and not a client library) and percentiles."""

import asyncio
import json


async def post(host, port, path, body):
    """POSTs JSON; returns (status line, reader, writer, chunked) with the headers read."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    status = (await reader.readline()).decode().strip()
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    return status, reader, writer, chunked


async def body_chunks(reader, chunked):
    """Yields the body's bytes as they arrive."""
    while True:
        if chunked:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.strip().split(b";")[0] or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def sse_events(reader, chunked):
    """Yields each server-sent event's JSON payload (`data: ...` lines, `[DONE]` left out)
    with the time it arrived."""
    import time
    buf = b""
    async for data in body_chunks(reader, chunked):
        buf += data
        now = time.perf_counter()
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            for line in ev.split(b"\n"):
                if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                    yield now, json.loads(line[6:])


async def n_tokens(host, port, text):
    """Tokens of `text` by the server's /tokenize (capy and llama-server both have it)."""
    status, reader, writer, chunked = await post(host, port, "/tokenize", {"content": text})
    body = b"".join([c async for c in body_chunks(reader, chunked)])
    writer.close()
    if " 200 " not in status + " ":
        raise RuntimeError(f"/tokenize: {status}: {body[:200]!r}")
    return len(json.loads(body)["tokens"])


def percentile(xs, p):
    """The `p`th percentile of `xs` (linear between ranks), NaN when empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
