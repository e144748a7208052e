#!/usr/bin/env python3
"""TCP new-connection rate for benches/run.sh: connect, send a few bytes, read the echo, close.

    tcp_conns.py HOST PORT [--secs S] [--conc N] [--size B] [--timeout T]
    tcp_conns.py HOST PORT --once     one connection; exit status 0 if it got its echo and EOF

Keeps N connections in flight for S seconds, each: non-blocking connect -> send B bytes -> read
until the B bytes came back and then the server's EOF -> close. The server closes first
(`tcp_echo.py --close-after B`), so its FIN travels back through the proxy and the TIME_WAIT
states stay on the listening sides: see tcp_echo.py. A connection counts once its echo and the
EOF arrived. One thread, one epoll loop, standard library only.

Prints one line `TCPCONNS {json}`: conns (completed within S seconds), rate (conns/s), opened
(every connection started, those still in flight at the deadline included: they are finished,
up to --timeout, but not counted in conns), errors (by errno name), p50/p99 of the
connect-to-EOF time in microseconds, and client_cpu (the fraction of one CPU this client used:
near 1.0 means the client, not the target, was the limit).
"""

import argparse
import errno
import json
import os
import select
import socket
import sys
import time

OUT = select.EPOLLOUT
IN = select.EPOLLIN
BAD = select.EPOLLERR | select.EPOLLHUP


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def once(addr, payload):
    """One blocking connection (readiness probe): 0 if the echo and then EOF came back."""
    try:
        with socket.create_connection(addr, timeout=1) as s:
            s.sendall(payload)
            got = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
    except OSError:
        return 1
    return 0 if got == payload else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--secs", type=float, default=5.0)
    ap.add_argument("--conc", type=int, default=32)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=5.0, help="per connection")
    ap.add_argument("--once", action="store_true")
    a = ap.parse_args()

    addr = (a.host, a.port)
    payload = b"weft-bench-echo!" * (a.size // 16 + 1)
    payload = payload[: a.size]
    if a.once:
        return once(addr, payload)
    ep = select.epoll()
    conns = {}  # fd -> [socket, start ns, bytes echoed so far, connected?]
    errors = {}
    lat = []
    done = 0
    opened = 0

    def err(name):
        errors[name] = errors.get(name, 0) + 1

    def finish(fd, ok_name=None):
        c = conns.pop(fd)
        try:
            ep.unregister(fd)
        except OSError:
            pass
        c[0].close()
        if ok_name:
            err(ok_name)

    def start():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        t = time.monotonic_ns()
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            err(errno.errorcode.get(rc, str(rc)))
            return False
        conns[s.fileno()] = [s, t, 0, False]
        ep.register(s.fileno(), OUT)
        nonlocal opened
        opened += 1
        return True

    cpu0 = os.times()
    t0 = time.monotonic()
    deadline = t0 + a.secs
    end_ns = int(deadline * 1e9)
    last_check = t0
    while True:
        now = time.monotonic()
        running = now < deadline
        if running:
            failed_starts = 0
            while len(conns) < a.conc and failed_starts < 8:
                if not start():
                    failed_starts += 1
            if failed_starts:
                time.sleep(0.001)  # e.g. out of local ports: don't spin
        elif not conns or now > deadline + a.timeout:
            break
        if now - last_check > 0.5:
            # Connections stuck longer than --timeout: count and drop them.
            last_check = now
            limit = time.monotonic_ns() - int(a.timeout * 1e9)
            for fd in [fd for fd, c in conns.items() if c[1] < limit]:
                finish(fd, "timeout")
        for fd, ev in ep.poll(0.05):
            c = conns.get(fd)
            if c is None:
                continue
            s = c[0]
            if not c[3]:
                rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if rc or ev & BAD:
                    finish(fd, errno.errorcode.get(rc, "connect") if rc else "connect")
                    continue
                c[3] = True
                try:
                    s.send(payload)
                except OSError as e:
                    finish(fd, errno.errorcode.get(e.errno, "send"))
                    continue
                ep.modify(fd, IN)
                continue
            try:
                data = s.recv(65536)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                finish(fd, errno.errorcode.get(e.errno, "recv"))
                continue
            if not data:
                if c[2] < a.size:
                    finish(fd, "closed_before_echo")
                    continue
                # The echo, then the server's EOF (forwarded by the proxy): done.
                t = time.monotonic_ns()
                if t <= end_ns:
                    done += 1
                    lat.append((t - c[1]) / 1000)
                finish(fd)
                continue
            c[2] += len(data)
    cpu1 = os.times()
    secs = a.secs
    lat.sort()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    out = {
        "conns": done,
        "secs": secs,
        "rate": done / secs,
        "opened": opened,
        "errors": errors,
        "p50_us": pct(lat, 50),
        "p99_us": pct(lat, 99),
        "client_cpu": round(cpu / max(time.monotonic() - t0, 1e-9), 3),
        "conc": a.conc,
        "size": a.size,
    }
    print("TCPCONNS " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
