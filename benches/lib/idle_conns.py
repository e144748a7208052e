#!/usr/bin/env python3
"""Open N keep-alive HTTP/1.1 connections, send one request on each, then hold them idle.

    idle_conns.py HOST PORT N [--host-header H] [--hold SECONDS]

Prints one line `ready ok=<n> failed=<n> secs=<t>` once every connection has either received
its response (ok) or failed, then holds the open connections idle until --hold seconds pass
or the process is signalled. Connections are opened in bounded batches so the listen backlog
is never flooded. Standard library only.
"""

import argparse
import asyncio
import resource
import sys
import time


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft < want:
        new_hard = max(hard, want) if hard != resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, new_hard))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def read_response(reader: asyncio.StreamReader) -> int:
    """Reads one response (headers + Content-Length body); returns the status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v.strip())
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def one(host, port, req, conns, errors, timeout):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(req)
        status = await asyncio.wait_for(read_response(reader), timeout)
        if 200 <= status < 300:
            conns.append(writer)
        else:
            errors.append(f"status {status}")
            writer.close()
    except Exception as e:  # noqa: BLE001 - any failure counts, the reason is tallied
        errors.append(type(e).__name__)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--host-header", default=None)
    ap.add_argument("--hold", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()
    raise_nofile(a.n)
    hh = a.host_header or f"{a.host}:{a.port}"
    req = f"GET / HTTP/1.1\r\nHost: {hh}\r\nUser-Agent: weft-bench-idle\r\n\r\n".encode()
    conns, errors = [], []
    t0 = time.monotonic()
    for i in range(0, a.n, a.batch):
        k = min(a.batch, a.n - i)
        await asyncio.gather(*(one(a.host, a.port, req, conns, errors, a.timeout) for _ in range(k)))
    secs = time.monotonic() - t0
    reasons = {}
    for e in errors:
        reasons[e] = reasons.get(e, 0) + 1
    why = ",".join(f"{k}:{v}" for k, v in sorted(reasons.items())) or "-"
    print(f"ready ok={len(conns)} failed={len(errors)} secs={secs:.1f} errors={why}", flush=True)
    await asyncio.sleep(a.hold)
    # Check how many survived the idle period (the peer may have closed some).
    alive = sum(1 for w in conns if not w.transport.is_closing())
    print(f"done alive={alive}", flush=True)
    for w in conns:
        w.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
