#!/usr/bin/env bash
# Added latency of a captured call (transparent mode) over the explicit-port path, same run.
#
#   benches/transparent.sh                  release build, 2000 requests per path and mode
#   benches/transparent.sh --requests=N     N sequential requests per path and mode
#
# Root only (network namespaces, iptables). Brings up `scripts/demo.sh --transparent --release`
# (the demo's namespaces, sidecars with `weft-proxy init` rules and mesh DNS), then, as the web
# app in its namespace, sends N sequential requests to api each way, interleaved
# (the Python client at the end of this file): captured = `http://api.demo:8080/` (mesh DNS -> VIP ->
# capture -> original destination -> per-port cluster, captured again inbound on api's host),
# explicit = `http://127.0.0.1:15001/` with `Host: api` (the same sidecars, no capture). Both with
# keep-alive and with a new connection per request; plus N mesh-DNS lookups. Prints p50 / p99 /
# mean and the differences, and stops the demo (its trap removes the namespaces). A measurement,
# not a test: run it on a quiet machine (a parallel cargo build changes every number).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
REQUESTS=2000
for arg in "$@"; do
  case $arg in
    --requests=*) REQUESTS=${arg#--requests=} ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "transparent.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [[ $(id -u) != 0 ]]; then
  echo "transparent.sh: needs root (network namespaces and iptables rules, via scripts/demo.sh --transparent)" >&2
  exit 1
fi

STATE=$ROOT/.weft-demo/transparent
LOG=$(mktemp /tmp/weft-transparent-bench.XXXXXX)
rm -f "$STATE/ready"
echo "==> starting scripts/demo.sh --transparent --release (log: $LOG)"
scripts/demo.sh --transparent --release >"$LOG" 2>&1 &
DEMO=$!
stop_demo() {
  if kill -0 "$DEMO" 2>/dev/null; then
    kill -TERM "$DEMO" 2>/dev/null || true
    wait "$DEMO" 2>/dev/null || true
  fi
}
trap stop_demo EXIT
trap 'exit 130' INT TERM

# The release build may take minutes the first time; then the demo is up in seconds.
for _ in $(seq 1 3600); do
  [[ -f $STATE/ready ]] && break
  if ! kill -0 "$DEMO" 2>/dev/null; then
    echo "transparent.sh: the demo exited before it was ready:" >&2
    cat "$LOG" >&2
    exit 1
  fi
  sleep 0.5
done
if [[ ! -f $STATE/ready ]]; then
  echo "transparent.sh: the demo was not ready within 30 minutes (log: $LOG)" >&2
  exit 1
fi

echo "==> $REQUESTS sequential requests per path and mode, from weftdemo-web (release build, $(nproc) cores)"
ip netns exec weftdemo-web python3 - --requests="$REQUESTS" <<'PY'
"""The client of benches/transparent.sh.

Runs inside the demo's `web` network namespace (an app with capture rules in front of it) and
sends N sequential GET requests each way, interleaved (captured, explicit, explicit, captured,
...), so both see the same machine noise:

  captured  GET http://api.demo:8080/    the name resolved once by the mesh DNS (the VIP); the
            connection is captured to 127.0.0.1:15001, routed by its original destination to
            the per-port cluster api.demo:8080, and captured again on api's host (-> 15006)
  explicit  GET http://127.0.0.1:15001/  Host: api: web's sidecar's explicit listener, routed by
            the Host header to api's inbound address (not captured on either side)

Both cross the same two sidecars over mTLS. Two modes: keep-alive (one connection per path, N
requests on it) and one new connection per request. Also N mesh-DNS lookups (getaddrinfo of
api.demo, through the capture of port 53). Prints p50 / p99 / mean per path and mode, and the
differences. A measurement, not a test.
"""

import argparse
import http.client
import socket
import statistics
import time


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def request(conn, host):
    conn.request("GET", "/", headers={"Host": host})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200 or b'"service":"api' not in body:
        raise SystemExit(f"unexpected answer via {host}: {r.status} {body[:200]!r}")


class Path:
    def __init__(self, name, addr, port, host, keepalive):
        self.name, self.addr, self.port, self.host = name, addr, port, host
        self.keepalive = keepalive
        self.conn = None
        self.samples = []

    def once(self, record=True):
        t0 = time.perf_counter_ns()
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.addr, self.port, timeout=10)
        request(self.conn, self.host)
        if not self.keepalive:
            self.conn.close()
            self.conn = None
        t1 = time.perf_counter_ns()
        if record:
            self.samples.append((t1 - t0) / 1000.0)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def row(name, mode, samples):
    return (
        f"{name:<10} {mode:<16} {len(samples):>6} {percentile(samples, 50):>9.0f} "
        f"{percentile(samples, 99):>9.0f} {statistics.fmean(samples):>9.0f}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--name", default="api.demo")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--sidecar", default="127.0.0.1:15001")
    ap.add_argument("--explicit-host", default="api")
    a = ap.parse_args()

    # The mesh DNS: lookups of the name, timed (the first result is the VIP the calls use).
    lookups = []
    vip = None
    for i in range(a.warmup + a.requests):
        t0 = time.perf_counter_ns()
        infos = socket.getaddrinfo(a.name, a.port, socket.AF_INET, socket.SOCK_STREAM)
        t1 = time.perf_counter_ns()
        vip = infos[0][4][0]
        if i >= a.warmup:
            lookups.append((t1 - t0) / 1000.0)

    side_ip, side_port = a.sidecar.rsplit(":", 1)
    results = {}
    for mode, keepalive in (("keep-alive", True), ("new connection", False)):
        captured = Path("captured", vip, a.port, f"{a.name}:{a.port}", keepalive)
        explicit = Path("explicit", side_ip, int(side_port), a.explicit_host, keepalive)
        for _ in range(a.warmup):
            captured.once(record=False)
            explicit.once(record=False)
        for i in range(a.requests):
            first, second = (captured, explicit) if i % 2 == 0 else (explicit, captured)
            first.once()
            second.once()
        captured.close()
        explicit.close()
        results[mode] = (captured.samples, explicit.samples)

    print(f"{a.name} -> {vip} (mesh DNS); explicit: {a.sidecar} Host: {a.explicit_host}")
    print(f"{'path':<10} {'mode':<16} {'n':>6} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}")
    for mode, (cap, exp) in results.items():
        print(row("explicit", mode, exp))
        print(row("captured", mode, cap))
    print(row("mesh DNS", "getaddrinfo A", lookups))
    print()
    for mode, (cap, exp) in results.items():
        d50 = percentile(cap, 50) - percentile(exp, 50)
        d99 = percentile(cap, 99) - percentile(exp, 99)
        print(
            f"added by capture ({mode}): p50 {d50:+.0f} us "
            f"({100.0 * d50 / percentile(exp, 50):+.1f} %), p99 {d99:+.0f} us"
        )


if __name__ == "__main__":
    main()
PY
echo
echo "(commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ', uncommitted changes'), $(date -u +%FT%TZ))"
