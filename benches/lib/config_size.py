#!/usr/bin/env python3
"""Config-size benchmark driver (issue 17, item 1); benches/config_size.sh calls it.

  config_size.py run --n N --bin-dir DIR --work DIR --json OUT [--rate R] [--duration S]
                     [--samples K] [--endpoints E] [--profile] [--pin] [--sched]
  config_size.py table OUT.json...

--endpoints E: every service but svc-0 gets E endpoints instead of 3..10 (to tell per-endpoint
from per-service cost); --pin: the sidecar runs on CPU 0 and everything else the driver starts
(control plane, nginx, h2load) on CPU 1 (taskset), the control plane SCHED_IDLE, so the p99 during pushes shows what the
sidecar's own build does to its requests rather than the control plane's compile next to it; --profile: `perf record` the sidecar's discovery thread during the
pushes and log its top symbols (perf.data and the report stay in --work).

`run` measures one N: it starts an upstream nginx (the one service the load calls), a real
weft-control on a generated policy of N services (each 3-10 static endpoints on 127.0.6.x, one
header route, one authorization policy) and one real weft-proxy sidecar (WEFT_WORKER_THREADS=1)
whose scope holds every service (no `dependencies:`), then measures:

- rss_mb: the sidecar's VmRSS after its first snapshot (and right after the push phase, 5 s
  later, and its VmHWM peak);
- bytes_first: bytes of discovery responses the sidecar received up to the first snapshot (its
  `weft_config_received_bytes_total`: encoded messages, gRPC/h2 framing excluded),
  bytes_per_push: the same over the push phase / pushes ACKed; wire_bytes_first /
  wire_bytes_per_push: the kernel's tcp_info bytes_received of the discovery socket (`ss -tin`,
  framing included) for the same;
- apply_ms: build + swap per push, the sidecar's own `weft_config_apply_duration_seconds`
  (sum / count over the push phase: merge, build and validate the snapshot, bind, swap);
  apply_first_ms: the same for the first snapshot;
- cpu_per_push_ms: CPU time of the sidecar's `weft-control*` threads (the control runtime's
  thread, which decodes a push, and its blocking thread, which builds and swaps the snapshot;
  /proc/PID/task/TID/schedstat, ns) over the push phase / pushes ACKed;
- apply_to_ack_ms: median / max over sequential single pushes of the wall time from the admin
  API's answer to `PUT /v1/policies/<file>` to the sidecar's `weft_config_updates_total
  {type="endpoints",result="ack"}` moving (includes the control plane's debounce and compile);
- p50/p99 of a fixed-rate HTTP/1.1 stream through the sidecar (h2load --h1 --rps, per-request
  log) steady, then while the control plane pushes one service's endpoint change every 100 ms
  (the admin API, as `weftctl apply` does).

Every process it starts is stopped by PID in a `finally`; every loop is bounded.
"""

import argparse
import http.client
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

NS = "cs"
CP = "127.0.6.1"  # weft-control: gRPC :15010, admin :15011
UP = "127.0.6.2"  # upstream nginx :18081-18083 (svc-0's endpoints)
SC = "127.0.6.3"  # the sidecar: admin :15000, outbound :15001, inbound :15006
UP_PORTS = (18081, 18082, 18083)
CHURN_FILE = "30-churn.yaml"


def log(msg):
    print(f"config_size: {msg}", file=sys.stderr, flush=True)


# Endpoints per service (0: 3..10, varying by service); --endpoints sets a fixed count.
EPS_FIXED = 0
# --pin: (the sidecar's CPU, everyone else's) for taskset; None: not pinned.
PIN = None


def pinned(argv, who):
    """`argv` under `taskset -c CPU` when --pin is given (`who`: "sidecar", "control" or
    "others"). The control plane also runs SCHED_IDLE (`chrt --idle 0`): its compile of every
    apply (~0.1 s of CPU at 1,000 services, ~1.3 s at 5,000) would otherwise take CPU 1 from the
    load generator and the upstream and show up as the *sidecar's* p99 during pushes; it stands
    in for a control plane on another machine and gets whatever CPU 1 leaves idle."""
    if PIN is None:
        return argv
    if who == "control":
        return ["taskset", "-c", PIN[1], "chrt", "--idle", "0"] + argv
    return ["taskset", "-c", PIN[0] if who == "sidecar" else PIN[1]] + argv


def endpoints_of(j):
    """Static endpoints of svc-j: svc-0 is the upstream, the others 3..10 addresses nobody serves."""
    if j == 0:
        return [f"{UP}:{p}" for p in UP_PORTS]
    count = EPS_FIXED or 3 + (j * 7) % 8
    return [f"127.0.6.{16 + k}:{20000 + j}" for k in range(count)]


def churn_yaml(j, step, revision=None):
    """svc-j in its own file, one endpoint's port moving with `step` (an endpoint-only change).
    `revision`: a comment line that makes the file new to the control plane (it parses,
    validates, compiles and compares it like any apply) while what it compiles to stays that of
    `step`, so nothing reaches the sidecar."""
    eps = endpoints_of(j)
    eps[0] = f"127.0.6.15:{30000 + step % 20000}"
    lines = [] if revision is None else [f"# revision {revision}"]
    lines += ["services:", f"  - name: svc-{j}", f"    namespace: {NS}", "    endpoints:"]
    lines += [f"      - address: \"{e}\"" for e in eps]
    return "\n".join(lines) + "\n"


def write_policy(n, d):
    os.makedirs(d, exist_ok=True)
    svc = ["services:", "  - name: client", f"    namespace: {NS}"]
    for j in range(n - 1):
        svc += [f"  - name: svc-{j}", f"    namespace: {NS}", "    endpoints:"]
        svc += [f"      - address: \"{e}\"" for e in endpoints_of(j)]
    routes = ["routes:"]
    authz = ["authorization:"]
    for j in range(n):
        name = f"svc-{j}"
        routes += [
            f"  - name: {name}-canary",
            f"    service: {name}.{NS}",
            "    match:",
            "      path: {prefix: /api}",
            "      headers: [{name: x-canary, exact: \"true\"}]",
            f"    destinations: [{{service: {name}.{NS}}}]",
            "    timeout: 2s",
        ]
        authz += [
            f"  - name: {name}-callers",
            f"    service: {name}.{NS}",
            "    default: deny",
            "    rules:",
            "      - name: callers",
            f"        from: {{namespaces: [{NS}]}}",
            "        to: {methods: [GET, POST], paths: [{prefix: /api}]}",
        ]
    files = {
        "00-services.yaml": "\n".join(svc) + "\n",
        "10-routes.yaml": "\n".join(routes) + "\n",
        "20-authorization.yaml": "\n".join(authz) + "\n",
        CHURN_FILE: churn_yaml(n - 1, 0),
    }
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return sum(len(endpoints_of(j)) for j in range(n))


class Procs:
    def __init__(self, work):
        self.work = work
        self.procs = []

    def start(self, name, argv, env=None):
        out = open(os.path.join(self.work, name + ".log"), "w")
        # --pin keeps every process in this session: with the kernel's autogroups
        # (kernel.sched_autogroup_enabled) each session is its own scheduling group, and the
        # control plane's SCHED_IDLE would only rank its threads within its own group, not
        # below nginx's, h2load's and the sidecar's.
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                             start_new_session=PIN is None)
        out.close()
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def http_get(url, timeout=2.0, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def wait_for(what, fn, deadline_s):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if fn():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {deadline_s:.0f} s")


SCRAPES = [0]  # /metrics scrapes of the sidecar so far (their CPU is taken out of build + swap)


def metrics(url):
    SCRAPES[0] += 1
    _, body = http_get(url, timeout=5)
    out = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            pass
    return out


def acks(m, typ=None):
    total = 0.0
    for k, v in m.items():
        if k.startswith("weft_config_updates_total{") and 'result="ack"' in k:
            if typ is None or f'type="{typ}"' in k:
                total += v
    return total


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def process_cpu_s(pid):
    """utime + stime of a whole process, in seconds (clock ticks: use over long phases only)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def control_tids(pid):
    """The proxy's control threads: `weft-control` (its runtime) and `weft-control-bg`
    (that runtime's blocking threads, which build snapshots; comm shows 15 characters)."""
    tids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip().startswith("weft-control"):
                    tids.append(tid)
        except OSError:
            pass
    if not tids:
        raise RuntimeError("no weft-control thread in the sidecar")
    return tids


def control_thread_ns(pid):
    """On-CPU ns of the proxy's `weft-control*` threads (discovery: decode, build, swap)."""
    total = 0
    found = False
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            if comm.startswith("weft-control"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
                found = True
        except OSError:
            pass
    if not found:
        raise RuntimeError("no weft-control thread in the sidecar")
    return total


def discovery_bytes():
    """tcp_info bytes_received of the sidecar's socket to the control plane's gRPC port."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", "dst", f"{CP}:15010"],
        capture_output=True, text=True, check=True,
    ).stdout
    vals = [int(x) for x in re.findall(r"bytes_received:(\d+)", out)]
    if len(vals) != 1:
        raise RuntimeError(f"expected one discovery connection to {CP}:15010, ss shows {len(vals)}")
    return vals[0]


def family_sum(m, name):
    """Sum of the samples of `name` (unlabelled or every label set) in a parsed scrape."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


class Admin:
    """The control plane's admin API (HTTPS, bearer token), one keep-alive connection."""

    def __init__(self, ca_dir):
        self.ctx = ssl.create_default_context(cafile=os.path.join(ca_dir, "roots.pem"))
        with open(os.path.join(ca_dir, "admin-token")) as f:
            self.token = f.read().strip().split()[-1]
        self.conn = None

    def put_policy(self, name, text):
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPSConnection(CP, 15011, context=self.ctx, timeout=30)
                self.conn.request(
                    "PUT", f"/v1/policies/{name}", body=text.encode(),
                    headers={"authorization": f"Bearer {self.token}", "content-type": "application/yaml"},
                )
                r = self.conn.getresponse()
                body = r.read()
                if r.status != 200:
                    raise RuntimeError(f"PUT /v1/policies/{name}: {r.status} {body[:300]!r}")
                return
            except (http.client.HTTPException, OSError):
                self.conn = None
                if attempt:
                    raise


def pct(vals, p):
    if not vals:
        return None
    k = (len(vals) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def load(work, tag, rate, duration):
    """h2load --h1 at `rate` req/s (5 connections) through the sidecar; p50/p99 in ms."""
    conns = 5
    logf = os.path.join(work, f"{tag}.h2load.log")
    out = subprocess.run(
        pinned(["h2load", "--h1", "-t", "1", "-c", str(conns), "--rps", str(max(1, rate // conns)),
                "-D", str(duration), "--warm-up-time=1", f"--log-file={logf}",
                "-H", f":authority: svc-0.{NS}", f"http://{SC}:15001/"], "others"),
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout
    with open(os.path.join(work, f"{tag}.h2load.out"), "w") as f:
        f.write(out)
    ok, bad = [], 0
    with open(logf) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                if 200 <= int(parts[1]) < 300:
                    ok.append(int(parts[2]))
                else:
                    bad += 1
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    failed = int(m.group(5)) if m else -1
    ok.sort()
    if not ok:
        raise RuntimeError(f"{tag}: no 2xx response through the sidecar (h2load: {out[-300:]})")
    return {
        "requests": len(ok),
        "rps": len(ok) / duration,
        "errors": bad + max(failed, 0),
        "p50": pct(ok, 50) / 1000,
        "p99": pct(ok, 99) / 1000,
    }


def load_during(churn, work, tag, a, recorders=()):
    """`load` while `churn` applies (started here, stopped when the load ends, as are the
    `recorders`: (perf process, timeout) pairs)."""
    churn.start()
    time.sleep(0.5)
    try:
        return load(work, tag, a.rate, a.duration)
    finally:
        churn.stop.set()
        churn.join(timeout=60)
        for proc, timeout in recorders:
            interrupt(proc, timeout)


class Churn(threading.Thread):
    """Rewrites svc-(N-1)'s endpoints through the admin API every `period` s (bounded)."""

    def __init__(self, admin, j, period, max_count, first_step, idle_applies=False):
        super().__init__(daemon=True)
        self.admin, self.j, self.period, self.max_count = admin, j, period, max_count
        self.step = first_step
        # idle_applies: the same applies with nothing new for the sidecar (churn_yaml's
        # `revision`): the control plane works as hard, nothing is pushed.
        self.idle_applies = idle_applies
        self.revision = 0
        self.stop = threading.Event()
        self.applied = 0
        self.apply_s = []
        self.error = None

    def run(self):
        nxt = self.started = time.monotonic()
        self.ended = None
        try:
            while not self.stop.is_set() and self.applied < self.max_count:
                t = time.monotonic()
                if self.idle_applies:
                    self.revision += 1
                    text = churn_yaml(self.j, self.step, revision=self.revision)
                else:
                    self.step += 1
                    text = churn_yaml(self.j, self.step)
                self.admin.put_policy(CHURN_FILE, text)
                self.apply_s.append(time.monotonic() - t)
                self.applied += 1
                nxt += self.period
                self.stop.wait(max(0.0, nxt - time.monotonic()))
        except Exception as e:  # reported by the caller
            self.error = e
        self.ended = time.monotonic()


def interrupt(proc, timeout):
    """Stops a recording `perf` the way Ctrl-C does (it then writes its file), killing it after
    `timeout` s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


SCHED_LINE = re.compile(r"^\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def sched_delays(data, pid, over_ms=0.3):
    """From a `perf sched record` file: every time one of the sidecar's data-path threads (its
    threads but the `weft-control*` ones) was woken and waited longer than `over_ms` for its
    CPU, grouped by what that CPU ran before it (`perf sched timehist`: sch delay): an idle CPU
    (the VM's vCPU wake-up), a kernel thread, another process, or the sidecar's own snapshot
    build (`weft-control-bg`)."""
    out = subprocess.run(["perf", "sched", "timehist", "-i", data], capture_output=True, text=True,
                         timeout=600).stdout
    last = {}  # cpu -> task that ran last
    groups = {}
    worker = re.compile(rf"\[(?:{pid}|\d+/{pid})\]$")
    for line in out.splitlines():
        m = SCHED_LINE.match(line)
        if not m:
            continue
        cpu, task, delay = m.group(2), m.group(3), float(m.group(5))
        is_worker = worker.search(task) and not task.startswith("weft-control")
        if is_worker and delay > over_ms:
            before = last.get(cpu, "?")
            if worker.search(before):
                kind = before.split("[")[0] + " (this sidecar)"
            elif before.startswith("<idle>"):
                kind = "idle CPU"
            else:
                kind = before.split("[")[0]
            g = groups.setdefault(kind, [0, 0.0, 0.0])
            g[0] += 1
            g[1] += delay
            g[2] = max(g[2], delay)
        last[cpu] = task
    return {k: {"count": v[0], "total_ms": round(v[1], 3), "max_ms": round(v[2], 3)}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][1])}


def run(a):
    n = a.n
    if n < 2:
        raise SystemExit("--n must be at least 2")
    work = a.work
    os.makedirs(work, exist_ok=True)
    procs = Procs(work)
    res = {"n": n, "rate": a.rate, "duration": a.duration, "endpoints_per_service": EPS_FIXED or "3-10",
           "pinned": PIN is not None}
    try:
        # Upstream nginx: svc-0's three endpoints.
        up = os.path.join(work, "up")
        os.makedirs(up, exist_ok=True)
        listens = "\n".join(f"    listen {UP}:{p};" for p in UP_PORTS)
        with open(os.path.join(up, "nginx.conf"), "w") as f:
            f.write(f"""daemon off;
master_process off;
user root;
worker_processes 1;
error_log {up}/error.log warn;
pid {up}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {up}/body;
  server {{
{listens}
    location / {{ default_type text/plain; return 200 "hello from the upstream\\n"; }}
  }}
}}
""")
        procs.start("nginx", pinned(["nginx", "-c", os.path.join(up, "nginx.conf"), "-p", up], "others"))
        wait_for("upstream nginx", lambda: http_get(f"http://{UP}:{UP_PORTS[0]}/")[0] == 200, 10)

        pol = os.path.join(work, "policies")
        res["endpoints"] = write_policy(n, pol)
        res["policy_bytes"] = sum(os.path.getsize(os.path.join(pol, f)) for f in os.listdir(pol) if f.endswith(".yaml"))
        ctl = procs.start("control", pinned([
            os.path.join(a.bin_dir, "weft-control"), "serve", "--policies", pol,
            "--grpc", f"{CP}:15010", "--admin", f"{CP}:15011", "--insecure-grpc",
        ], "control"), env={**os.environ, "RUST_LOG": "warn"})
        ca = os.path.join(pol, ".weft-ca")

        def cp_ready():
            if ctl.poll() is not None:
                raise SystemExit(f"weft-control exited; see {work}/control.log")
            ctx = ssl.create_default_context(cafile=os.path.join(ca, "roots.pem"))
            with urllib.request.urlopen(f"https://{CP}:15011/healthz", timeout=2, context=ctx) as r:
                return r.status == 200
        wait_for("weft-control", cp_ready, 120)
        admin = Admin(ca)

        boot = os.path.join(work, "bootstrap.yaml")
        with open(boot, "w") as f:
            f.write(f"""node: {{service: client, namespace: {NS}, id: client-0}}
admin: {SC}:15000
control_plane: http://{CP}:15010
inbound: {{address: "{SC}:15006", app: "{UP}:9"}}
outbound: {{address: "{SC}:15001", tcp_bind_ip: {SC}}}
""")
        t0 = time.monotonic()
        proxy = procs.start("proxy", pinned([os.path.join(a.bin_dir, "weft-proxy"), "--config", boot], "sidecar"),
                            env={**os.environ, "WEFT_WORKER_THREADS": "1", "RUST_LOG": "warn"})
        murl = f"http://{SC}:15000/metrics"

        def first_snapshot():
            if proxy.poll() is not None:
                raise SystemExit(f"weft-proxy exited; see {work}/proxy.log")
            return acks(metrics(murl), "endpoints") >= 1 and http_get(
                f"http://{SC}:15001/", headers={"host": f"svc-0.{NS}"})[0] == 200
        wait_for("the sidecar's first snapshot and a 200 through it", first_snapshot, 300)
        res["first_snapshot_s"] = time.monotonic() - t0
        time.sleep(2)  # let allocator and metrics settle
        res["rss_mb"] = rss_kb(proxy.pid) / 1024
        res["wire_bytes_first"] = discovery_bytes()
        m0 = metrics(murl)
        res["bytes_first"] = family_sum(m0, "weft_config_received_bytes_total")
        res["apply_first_ms"] = family_sum(m0, "weft_config_apply_duration_seconds_sum") * 1000
        _, body = http_get(murl, timeout=5)
        with open(os.path.join(work, "metrics-first-snapshot.txt"), "wb") as f:
            f.write(body)
        res["metrics_bytes"] = len(body)
        res["metrics_series"] = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        log(f"N={n}: first snapshot after {res['first_snapshot_s']:.2f} s, RSS {res['rss_mb']:.1f} MB, "
            f"{res['bytes_first']:,.0f} bytes received ({res['wire_bytes_first']:,} on the wire), "
            f"first build + swap {res['apply_first_ms']:.1f} ms, {res['metrics_series']:,} metric series")

        # Sequential single pushes: admin API answer -> the sidecar's ACK of new endpoints.
        lat = []
        step = 0
        for _ in range(a.samples):
            before = acks(metrics(murl), "endpoints")
            step += 1
            admin.put_policy(CHURN_FILE, churn_yaml(n - 1, step))
            t = time.monotonic()
            end = t + 30
            while time.monotonic() < end:
                if acks(metrics(murl), "endpoints") > before:
                    break
                time.sleep(0.002)
            else:
                raise RuntimeError("an endpoint change never reached the sidecar within 30 s")
            lat.append((time.monotonic() - t) * 1000)
            time.sleep(0.2)
        res["apply_to_ack_ms"] = statistics.median(lat)
        res["apply_to_ack_max_ms"] = max(lat)

        # Steady stream.
        res["steady"] = load(work, "steady", a.rate, a.duration)
        log(f"N={n}: steady p50 {res['steady']['p50']:.3f} ms p99 {res['steady']['p99']:.3f} ms")

        # The same stream while the control plane works as hard as during the pushes (the same
        # applies every 100 ms, each compiling to what the sidecar already has, so nothing is
        # pushed): on 2 cores its compile competes with the load generator and the upstream, and
        # this phase shows that cost alone; the push phase adds the sidecar's own work.
        a0 = acks(metrics(murl))
        busy = Churn(admin, n - 1, 0.1, int(a.duration * 10) + 40, step, idle_applies=True)
        res["busy"] = load_during(busy, work, "busy", a)
        if busy.error:
            raise RuntimeError(f"the apply loop failed: {busy.error}")
        time.sleep(1.5 * res["apply_to_ack_max_ms"] / 1000)
        res["busy_applies"] = busy.applied
        res["busy_pushes"] = acks(metrics(murl)) - a0
        log(f"N={n}: control plane busy, nothing pushed: p50 {res['busy']['p50']:.3f} ms p99 "
            f"{res['busy']['p99']:.3f} ms; {busy.applied} applies, {res['busy_pushes']:.0f} pushes ACKed")

        # The admin server shares the discovery thread: what one /metrics scrape costs it, to take
        # the scrapes made while waiting for the last ACKs out of the CPU per push.
        t = control_thread_ns(proxy.pid)
        for _ in range(5):
            metrics(murl)
        res["scrape_ms"] = (control_thread_ns(proxy.pid) - t) / 5 / 1e6

        # The same stream while the control plane pushes an endpoint change every 100 ms.
        m1 = metrics(murl)
        c1, b1, k1 = control_thread_ns(proxy.pid), discovery_bytes(), process_cpu_s(ctl.pid)
        s1 = SCRAPES[0]
        churn = Churn(admin, n - 1, 0.1, int(a.duration * 10) + 40, step)
        perf = None
        if a.profile:
            # Samples of the sidecar's control threads only (decode, build, swap).
            perf = subprocess.Popen(
                ["perf", "record", "-q", "-F", "499", "-g", "-t", ",".join(control_tids(proxy.pid)),
                 "-o", os.path.join(work, "perf.data")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sched = None
        if a.sched:
            sched = subprocess.Popen(["perf", "sched", "record", "-a", "-o", os.path.join(work, "sched.data")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        recorders = [(p, t) for p, t in ((sched, 60), (perf, 30)) if p is not None]
        res["push"] = load_during(churn, work, "push", a, recorders)
        if sched is not None:
            res["sched_delays"] = sched_delays(os.path.join(work, "sched.data"), proxy.pid)
            log(f"N={n}: the sidecar's data-path thread woken and kept waiting > 0.3 ms during pushes, "
                f"by what its CPU ran before: {json.dumps(res['sched_delays'])}")
        if perf is not None:
            rep = subprocess.run(
                ["perf", "report", "-i", os.path.join(work, "perf.data"), "--no-children",
                 "--sort", "symbol", "--stdio", "-g", "none", "--percent-limit", "1"],
                capture_output=True, text=True, timeout=300).stdout
            with open(os.path.join(work, "perf-control-thread.txt"), "w") as f:
                f.write(rep)
            top = [line for line in rep.splitlines() if line.strip() and not line.startswith("#")][:25]
            log(f"N={n}: where the sidecar's discovery thread spent its time during pushes:\n" + "\n".join(top))
        if churn.error:
            raise RuntimeError(f"the push loop failed: {churn.error}")
        # The last pushes land: wait until the sidecar's ACKs have not moved for longer than one
        # apply -> ACK took above (bounded), so bytes and CPU are those of ACKed pushes.
        quiet = max(1.0, 1.5 * res["apply_to_ack_max_ms"] / 1000)
        last, since, end = acks(metrics(murl), "endpoints"), time.monotonic(), time.monotonic() + 60
        while time.monotonic() < end and time.monotonic() - since < quiet:
            time.sleep(0.25)
            now = acks(metrics(murl), "endpoints")
            if now != last:
                last, since = now, time.monotonic()
        m2 = metrics(murl)
        c2, b2, k2 = control_thread_ns(proxy.pid), discovery_bytes(), process_cpu_s(ctl.pid)
        scrape_ns = (SCRAPES[0] - s1) * res["scrape_ms"] * 1e6
        pushes = acks(m2) - acks(m1)
        ep_pushes = acks(m2, "endpoints") - acks(m1, "endpoints")
        res["applies"] = churn.applied
        res["applies_per_s"] = churn.applied / max(1e-3, (churn.ended or time.monotonic()) - churn.started)
        res["apply_call_ms"] = statistics.median(churn.apply_s) * 1000 if churn.apply_s else None
        res["pushes_acked"] = ep_pushes
        res["types_acked"] = pushes
        nacks = sum(v for k, v in m2.items() if k.startswith("weft_config_updates_total{") and 'result="nack"' in k)
        res["nacks"] = nacks
        if ep_pushes <= 0:
            raise RuntimeError("no endpoint push was ACKed during the push phase")
        res["cpu_per_push_ms"] = max(0.0, c2 - c1 - scrape_ns) / ep_pushes / 1e6
        res["wire_bytes_per_push"] = (b2 - b1) / ep_pushes
        res["bytes_per_push"] = (family_sum(m2, "weft_config_received_bytes_total")
                                 - family_sum(m1, "weft_config_received_bytes_total")) / ep_pushes
        applied = (family_sum(m2, "weft_config_apply_duration_seconds_count")
                   - family_sum(m1, "weft_config_apply_duration_seconds_count"))
        res["apply_ms"] = 1000 * (family_sum(m2, "weft_config_apply_duration_seconds_sum")
                                  - family_sum(m1, "weft_config_apply_duration_seconds_sum")) / max(1, applied)
        res["rss_after_mb"] = rss_kb(proxy.pid) / 1024
        res["rss_peak_mb"] = rss_kb(proxy.pid, "VmHWM") / 1024
        res["cp_cpu_per_apply_ms"] = (k2 - k1) / max(1, churn.applied) * 1000
        time.sleep(5)  # jemalloc returns pages free for 1 s; what stays is held
        res["rss_settled_mb"] = rss_kb(proxy.pid) / 1024
        res["p99_ratio"] = res["push"]["p99"] / res["steady"]["p99"]
        res["p99_ratio_busy"] = res["push"]["p99"] / res["busy"]["p99"]
        log(f"N={n}: during pushes p50 {res['push']['p50']:.3f} ms p99 {res['push']['p99']:.3f} ms; "
            f"{churn.applied} applies, {ep_pushes:.0f} endpoint pushes ACKed, "
            f"build + swap {res['apply_ms']:.2f} ms per push (weft_config_apply_duration_seconds), "
            f"{res['cpu_per_push_ms']:.2f} ms sidecar control-thread CPU per push")
    finally:
        procs.stop_all()
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)


def verdict(ok):
    return "met" if ok else "**missed**"


def table(paths):
    rows = [json.load(open(p)) for p in paths]
    rows.sort(key=lambda r: r["n"])
    out = [
        "| services | endpoints | RSS: 1st snapshot | RSS: after pushes (+5 s), peak | received: 1st snapshot "
        "| received per push | build + swap per push | sidecar CPU per push | apply -> ACK, median (max) | steady p50 / p99 "
        "| control plane busy, no push: p50 / p99 | pushing p50 / p99 | p99 ratio: vs steady (vs busy) "
        "| pushes ACKed / applies (per s) | control plane CPU per apply | metric series | errors |",
        "|" + "---:|" * 17,
    ]
    for r in rows:
        s, p = r["steady"], r["push"]
        b = r.get("busy")
        busy = "-" if b is None else f"{b['p50']:.3f} / {b['p99']:.3f} ms ({r['busy_pushes']:.0f} pushed)"
        vs_busy = "" if b is None else f" ({r['p99_ratio_busy']:.2f}x)"
        out.append(
            f"| {r['n']:,} | {r['endpoints']:,} | {r['rss_mb']:.1f} MB "
            f"| {r['rss_after_mb']:.1f} MB ({r['rss_settled_mb']:.1f} MB), {r['rss_peak_mb']:.0f} MB "
            f"| {r['bytes_first'] / 1024:,.0f} KiB | {r['bytes_per_push'] / 1024:,.1f} KiB "
            f"| {r['apply_ms']:.1f} ms | {r['cpu_per_push_ms']:.1f} ms | {r['apply_to_ack_ms']:.0f} ({r['apply_to_ack_max_ms']:.0f}) ms "
            f"| {s['p50']:.3f} / {s['p99']:.3f} ms | {busy} | {p['p50']:.3f} / {p['p99']:.3f} ms "
            f"| {r['p99_ratio']:.2f}x{vs_busy} "
            f"| {r['pushes_acked']:.0f} / {r['applies']} ({r['applies_per_s']:.1f}) "
            f"| {r['cp_cpu_per_apply_ms']:.0f} ms | {r['metrics_series']:,} | {s['errors']} / {p['errors']} |"
        )
    by_n = {r["n"]: r for r in rows}
    out += ["", "Targets (issue 17):", ""]
    t = []
    if 1000 in by_n:
        r = by_n[1000]
        t.append(f"- RSS <= 20 MB at 1,000 services: {r['rss_mb']:.1f} MB, {verdict(r['rss_mb'] <= 20)}")
    if 5000 in by_n:
        r = by_n[5000]
        t.append(f"- RSS <= 60 MB at 5,000 services: {r['rss_mb']:.1f} MB, {verdict(r['rss_mb'] <= 60)}")
    if 1000 in by_n:
        r = by_n[1000]
        t.append(f"- build + swap <= 20 ms at 1,000 services (weft_config_apply_duration_seconds, mean per push): "
                 f"{r['apply_ms']:.2f} ms, {verdict(r['apply_ms'] <= 20)} (sidecar control-thread CPU per push "
                 f"{r['cpu_per_push_ms']:.2f} ms)")
    for r in rows:
        t.append(f"- p99 during pushes <= 1.5x steady p99 at {r['n']:,} services: {r['p99_ratio']:.2f}x "
                 f"({r['push']['p99']:.3f} vs {r['steady']['p99']:.3f} ms), {verdict(r['p99_ratio'] <= 1.5)}")
        if r.get("busy"):
            t.append(f"  - what the pushes add to the control plane's own load at {r['n']:,} services (p99 during "
                     f"pushes vs the same applies with nothing pushed): {r['p99_ratio_busy']:.2f}x "
                     f"({r['push']['p99']:.3f} vs {r['busy']['p99']:.3f} ms), {verdict(r['p99_ratio_busy'] <= 1.5)}")
        if "sched_delays" in r:
            d = r["sched_delays"]
            what = "; ".join(f"{k}: {v['count']} ({v['total_ms']:.1f} ms in all, max {v['max_ms']:.1f})"
                             for k, v in d.items()) or "none"
            t.append(f"  - the sidecar's data-path thread woken and kept waiting > 0.3 ms for its CPU during the "
                     f"pushes at {r['n']:,} services, by what that CPU ran before (--sched): {what}")
    if not t:
        t.append("- (no target applies to the N measured: targets are at 1,000 and 5,000 services)")
    print("\n".join(out + t))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--bin-dir", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--rate", type=int, default=500)
    r.add_argument("--duration", type=int, default=15)
    r.add_argument("--samples", type=int, default=10)
    r.add_argument("--profile", action="store_true", help="perf record the sidecar's discovery thread during pushes")
    r.add_argument("--endpoints", type=int, default=0, help="endpoints per service (0: 3..10)")
    r.add_argument("--pin", action="store_true", help="sidecar on CPU 0, everything else on CPU 1")
    r.add_argument("--sched", action="store_true",
                   help="perf sched record during the pushes: what kept the sidecar's data path waiting for its CPU")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    a = ap.parse_args()
    if a.cmd == "run":
        global EPS_FIXED, PIN
        EPS_FIXED = a.endpoints
        if a.pin:
            PIN = ("0", "1")
            # This driver too (its push loop and /metrics polls): off the sidecar's CPU.
            os.sched_setaffinity(0, {1})
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        run(a)
    else:
        table(a.files)


if __name__ == "__main__":
    main()
