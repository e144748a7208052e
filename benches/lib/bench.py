#!/usr/bin/env python3
"""Helpers for benches/run.sh (standard library only).

Process probes:
  bench.py cpu PID...                      utime+stime of the PIDs, summed, in clock ticks
  bench.py cpu-user PID...                 utime alone (user space), in clock ticks
  bench.py rss PID...                      VmRSS of the PIDs, summed, in kB
  bench.py sample-rss OUT SECS PID...      samples VmRSS every 0.2 s for SECS s, writes the max kB
  bench.py children PID                    the PIDs whose parent is PID

Results (a JSON file: {target: {metric: value | {"fail": reason}}}):
  bench.py put RES TARGET METRIC VALUE
  bench.py fail RES TARGET METRIC REASON
  bench.py get RES TARGET METRIC           prints the value (empty if absent/failed)
  bench.py wrk RES TARGET PREFIX FILE      parses wrk output (benches/lib/wrk_json.lua line)
  bench.py oha RES TARGET PREFIX FILE      parses `oha --output-format json` (or -j) output
  bench.py h2load RES TARGET PREFIX FILE [LOG]   parses h2load output (+ per-request log)
  bench.py iperf RES TARGET PREFIX FILE    parses `iperf3 -J` output
  bench.py tcpconns RES TARGET PREFIX FILE parses lib/tcp_conns.py output
  bench.py merge OUT RES...                the median of each numeric metric over the rounds'
                                           result files, with METRIC@range = [min, max] and
                                           METRIC@fails = the failures of some rounds
  bench.py report RES META OUT.md          prints the table and writes OUT.md

Each parser stores PREFIX.rps / .p50 / .p99 / .p999 (ms) / .err / ... and prints one summary
line; when the tool produced nothing usable it stores a failure with the reason instead.
"""

import json
import os
import re
import statistics
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- process probes


def cpu_ticks(pids, user_only=False):
    """utime+stime (or utime alone) of the PIDs, summed, in clock ticks."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the ")" of the command name: state is field 3, utime 14, stime 15.
        rest = stat[stat.rindex(")") + 2 :].split()
        total += int(rest[11]) + (0 if user_only else int(rest[12]))
    return total


def rss_kb(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        if rest[1] == str(pid):
            out.append(int(d))
    return sorted(out)


# ----------------------------------------------------------------------------- results store


def load(res):
    try:
        with open(res) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save(res, data):
    tmp = res + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, res)


def put(res, target, metric, value):
    data = load(res)
    data.setdefault(target, {})[metric] = value
    save(res, data)


def fail(res, target, metric, reason):
    put(res, target, metric, {"fail": reason})


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------- parsers


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def last_line_hint(text):
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return (lines[-1] if lines else "no output")[:120]


def parse_wrk(res, target, prefix, path):
    text = read(path)
    m = re.search(r"^WRKJSON (\{.*\})$", text, re.M)
    if not m:
        fail(res, target, prefix + ".rps", "wrk: " + last_line_hint(text))
        print(f"{target} {prefix}: FAILED ({last_line_hint(text)})")
        return
    j = json.loads(m.group(1))
    secs = j["duration_us"] / 1e6
    errs = j["err_connect"] + j["err_read"] + j["err_write"] + j["err_status"] + j["err_timeout"]
    # wrk counts every completed response in `requests`, non-2xx/3xx ones in err_status.
    ok = max(j["requests"] - j["err_status"], 0)
    if ok == 0:
        fail(res, target, prefix + ".rps", f"no successful responses ({errs} errors)")
        print(f"{target} {prefix}: FAILED (no successful responses, {errs} errors)")
        return
    d = load(res)
    t = d.setdefault(target, {})
    t[prefix + ".rps"] = ok / secs
    t[prefix + ".requests"] = ok
    t[prefix + ".p50"] = j["p50_us"] / 1000
    t[prefix + ".p99"] = j["p99_us"] / 1000
    t[prefix + ".p999"] = j["p999_us"] / 1000
    t[prefix + ".err"] = errs
    if errs:
        t[prefix + ".errdetail"] = (
            f"connect {j['err_connect']} read {j['err_read']} write {j['err_write']} "
            f"status {j['err_status']} timeout {j['err_timeout']}"
        )
    save(res, d)
    print(
        f"{target} {prefix}: {ok / secs:,.0f} req/s  p50 {j['p50_us'] / 1000:.3f} ms  "
        f"p99 {j['p99_us'] / 1000:.3f} ms  p99.9 {j['p999_us'] / 1000:.3f} ms  errors {errs}"
    )


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def parse_oha(res, target, prefix, path):
    text = read(path)
    try:
        j = json.loads(text[text.index("{") :])
    except ValueError:
        fail(res, target, prefix + ".rps", "oha: " + last_line_hint(text))
        print(f"{target} {prefix}: FAILED ({last_line_hint(text)})")
        return
    summ = j.get("summary", {})
    pcts = j.get("latencyPercentiles", {})
    codes = j.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    bad = sum(v for k, v in codes.items() if not k.startswith("2"))
    errs = bad + sum(j.get("errorDistribution", {}).values())
    total_secs = summ.get("total") or 0
    if ok == 0 or not total_secs:
        fail(res, target, prefix + ".rps", f"no successful responses ({errs} errors)")
        print(f"{target} {prefix}: FAILED (no successful responses, {errs} errors)")
        return
    d = load(res)
    t = d.setdefault(target, {})
    t[prefix + ".rps"] = ok / total_secs
    t[prefix + ".requests"] = ok
    for key, name in (("p50", "p50"), ("p99", "p99"), ("p99.9", "p999")):
        v = pcts.get(key)
        if v is not None:
            t[prefix + "." + name] = v * 1000
    t[prefix + ".err"] = errs
    if errs:
        t[prefix + ".errdetail"] = json.dumps(
            {**{k: v for k, v in codes.items() if not k.startswith("2")}, **j.get("errorDistribution", {})}
        )[:200]
    save(res, d)
    print(
        f"{target} {prefix}: {ok / total_secs:,.0f} req/s  p50 {t.get(prefix + '.p50', 0):.3f} ms  "
        f"p99 {t.get(prefix + '.p99', 0):.3f} ms  p99.9 {t.get(prefix + '.p999', 0):.3f} ms  errors {errs}"
    )


def parse_h2load(res, target, prefix, path, log=None):
    text = read(path)
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", text)
    r = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not m or not r:
        fail(res, target, prefix + ".rps", "h2load: " + last_line_hint(text))
        print(f"{target} {prefix}: FAILED ({last_line_hint(text)})")
        return
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    ok2xx = int(codes.group(1)) if codes else int(r.group(4))
    failed = int(r.group(5)) + int(r.group(6)) + int(r.group(7))
    non2xx = (int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4))) if codes else 0
    # "timeout"/"errored" are also counted in "failed" by h2load; don't double count them.
    errs = int(r.group(5)) + non2xx
    if ok2xx == 0:
        fail(res, target, prefix + ".rps", f"no 2xx responses ({failed} failed, {non2xx} non-2xx)")
        print(f"{target} {prefix}: FAILED (no 2xx responses, {failed} failed, {non2xx} non-2xx)")
        return
    d = load(res)
    t = d.setdefault(target, {})
    t[prefix + ".rps"] = ok2xx / secs if secs else 0
    t[prefix + ".requests"] = ok2xx
    t[prefix + ".err"] = errs
    if errs:
        t[prefix + ".errdetail"] = f"failed {r.group(5)} errored {r.group(6)} timeout {r.group(7)} non-2xx {non2xx}"
    lat = None
    if log:
        vals = []
        for line in read(log).splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                try:
                    if 200 <= int(parts[1]) < 300:
                        vals.append(int(parts[2]))
                except ValueError:
                    pass
        vals.sort()
        if vals:
            lat = vals
            t[prefix + ".p50"] = pct(vals, 50) / 1000
            t[prefix + ".p99"] = pct(vals, 99) / 1000
            t[prefix + ".p999"] = pct(vals, 99.9) / 1000
    else:
        mm = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
        if mm:
            t[prefix + ".mean"] = to_ms(mm.group(3))
    save(res, d)
    extra = ""
    if lat:
        extra = f"  p50 {t[prefix + '.p50']:.3f} ms  p99 {t[prefix + '.p99']:.3f} ms  p99.9 {t[prefix + '.p999']:.3f} ms"
    print(f"{target} {prefix}: {t[prefix + '.rps']:,.0f} req/s{extra}  errors {errs}")


def to_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    if not m:
        return None
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


def parse_iperf(res, target, prefix, path):
    text = read(path)
    try:
        j = json.loads(text[text.index("{") :])
    except ValueError:
        fail(res, target, prefix + ".mbps", "iperf3: " + last_line_hint(text))
        print(f"{target} {prefix}: FAILED ({last_line_hint(text)})")
        return
    if j.get("error"):
        fail(res, target, prefix + ".mbps", "iperf3: " + j["error"][:120])
        print(f"{target} {prefix}: FAILED ({j['error']})")
        return
    bps = j.get("end", {}).get("sum_received", {}).get("bits_per_second")
    if not bps:
        fail(res, target, prefix + ".mbps", "iperf3: no received bytes")
        print(f"{target} {prefix}: FAILED (no received bytes)")
        return
    put(res, target, prefix + ".mbps", bps / 8 / 1e6)
    print(f"{target} {prefix}: {bps / 8 / 1e6:,.0f} MB/s")


def parse_tcpconns(res, target, prefix, path):
    text = read(path)
    m = re.search(r"^TCPCONNS (\{.*\})$", text, re.M)
    if not m:
        fail(res, target, prefix + ".rps", "tcp_conns.py: " + last_line_hint(text))
        print(f"{target} {prefix}: FAILED ({last_line_hint(text)})")
        return
    j = json.loads(m.group(1))
    errs = sum(j["errors"].values())
    if not j["conns"]:
        fail(res, target, prefix + ".rps", f"no connection completed ({json.dumps(j['errors'])[:80]})")
        print(f"{target} {prefix}: FAILED (no connection completed, errors {j['errors']})")
        return
    d = load(res)
    t = d.setdefault(target, {})
    t[prefix + ".rps"] = j["rate"]
    t[prefix + ".conns"] = j["conns"]
    t[prefix + ".opened"] = j["opened"]
    t[prefix + ".p50"] = j["p50_us"] / 1000
    t[prefix + ".p99"] = j["p99_us"] / 1000
    t[prefix + ".err"] = errs
    t[prefix + ".client_cpu"] = j["client_cpu"]
    if errs:
        t[prefix + ".errdetail"] = json.dumps(j["errors"])[:200]
    save(res, d)
    print(
        f"{target} {prefix}: {j['rate']:,.0f} conns/s  p50 {j['p50_us'] / 1000:.3f} ms  "
        f"p99 {j['p99_us'] / 1000:.3f} ms  errors {errs}  client CPU {j['client_cpu']:.0%}"
    )


# ----------------------------------------------------------------------------- rounds


def merge(out, *paths):
    """Combines the result files of N rounds into one: numeric metrics become the median of the
    rounds that measured them (with `@range` = [min, max] when there was more than one round,
    and `@rounds` = the value of each round in order, None where it was not measured);
    a metric that failed in some rounds keeps the others' median and lists the failures in
    `@fails`; a metric that failed in every round keeps the first failure; strings that differ
    between rounds are shown per round."""
    rounds = [load(p) for p in paths]
    merged = {}
    targets = sorted({t for r in rounds for t in r})
    for t in targets:
        metrics = sorted({m for r in rounds for m in r.get(t, {})})
        dst = merged.setdefault(t, {})
        for m in metrics:
            vals = [(i + 1, r[t][m]) for i, r in enumerate(rounds) if m in r.get(t, {})]
            nums = [v for _, v in vals if num(v) is not None]
            fails = [f"round {i}: {v.get('fail', '?')}" for i, v in vals if isinstance(v, dict)]
            if nums:
                dst[m] = statistics.median(nums)
                if len(nums) > 1:
                    dst[m + "@range"] = [min(nums), max(nums)]
                if len(rounds) > 1:
                    # Round by round (None: not measured): paired ratios between targets.
                    dst[m + "@rounds"] = [num(r.get(t, {}).get(m)) for r in rounds]
                if fails:
                    dst[m + "@fails"] = fails
            elif fails and len(fails) == len(vals):
                dst[m] = vals[0][1]
            else:
                texts = [(i, str(v)) for i, v in vals if not isinstance(v, dict)]
                if len({v for _, v in texts}) <= 1:
                    dst[m] = texts[0][1] if texts else vals[0][1]
                else:
                    dst[m] = "; ".join(f"r{i}: {v}" for i, v in texts)
    save(out, merged)


# ----------------------------------------------------------------------------- report

TARGETS = ["direct", "weft", "weft-mesh", "weft-mesh-mtls", "haproxy", "nginx"]

# (metric key, label, unit format, higher_is_better, proxies_only)
ROWS = [
    ("fix.p50", "HTTP/1.1 fixed rate: p50 (ms)", "ms", False, False),
    ("fix.p99", "HTTP/1.1 fixed rate: p99 (ms)", "ms", False, False),
    ("fix.p999", "HTTP/1.1 fixed rate: p99.9 (ms)", "ms", False, False),
    ("fix.added_p50", "HTTP/1.1 fixed rate: added p50 vs direct (ms)", "ms", False, True),
    ("fix.rps", "HTTP/1.1 fixed rate: achieved req/s", "int", True, False),
    ("sat.rps", "HTTP/1.1 keep-alive saturation: req/s", "int", True, False),
    ("sat.p50", "HTTP/1.1 saturation: p50 (ms)", "ms", False, False),
    ("sat.p99", "HTTP/1.1 saturation: p99 (ms)", "ms", False, False),
    ("sat.p999", "HTTP/1.1 saturation: p99.9 (ms)", "ms", False, False),
    ("h2.rps", "HTTP/2 (h2c, multiplexed): req/s", "int", True, False),
    ("conn.rps", "new connections/s (HTTP/1.1, Connection: close)", "int", True, False),
    ("tcp.mbps", "TCP throughput (MB/s)", "int", True, False),
    ("tcpconn.rps", "TCP new connections/s (connect, echo, close)", "int", True, False),
    ("cpu.sat", "CPU per request, h1 saturation (µs)", "us", False, True),
    ("cpu.sat.user", "CPU per request, h1 saturation: user space only (µs)", "us", False, True),
    ("cpu.h2", "CPU per request, h2 (µs)", "us", False, True),
    ("cpu.tcpconn", "CPU per TCP connection (µs)", "us", False, True),
    ("rss.idle", "RSS idle (MB)", "mb", False, True),
    ("rss.load", "RSS under load, max (MB)", "mb", False, True),
    ("rss.10k", "RSS with 10k idle keep-alive conns (MB)", "mb", False, True),
    ("idle.ok", "idle conns held / opened ok", "str", True, True),
    ("tls.inbound", "callees' inbound conns accepted during the cases, by transport", "str", True, True),
    ("conn.inbound", "sidecar-to-sidecar conns opened in the new-conn case", "int", False, True),
    (
        "tcpconn.inbound",
        "sidecar-to-sidecar conns (mtls = handshakes) / client conns, TCP new-conn case",
        "str",
        False,
        True,
    ),
    ("errors", "errors (fixed/sat/h2/conn/tcpconn)", "str", False, False),
]


def fmt(v, unit):
    if isinstance(v, dict):
        return "FAIL: " + str(v.get("fail", "?"))[:70]
    if v is None:
        return "–"
    if unit == "str":
        return str(v)
    if unit == "ms":
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if unit == "us":
        return f"{v:.1f}"
    if unit == "mb":
        return f"{v:.1f}"
    if unit == "int":
        return f"{v:,.0f}"
    return str(v)


def spread(t, key, unit):
    """' [min–max]' of a metric measured in several rounds, when they differ."""
    r = t.get(key + "@range")
    if not isinstance(r, list) or len(r) != 2 or r[0] == r[1]:
        return ""
    return f" [{fmt(r[0], unit)}–{fmt(r[1], unit)}]"


def ratio(v, ref):
    v, ref = num(v), num(ref)
    if v is None or ref is None or ref == 0:
        return None
    return v / ref


# (metric key, label, higher is better): weft against HAProxy and against nginx, each.
PAIRED = [
    ("sat.rps", "HTTP/1.1 keep-alive req/s", True),
    ("h2.rps", "HTTP/2 req/s", True),
    ("cpu.sat", "CPU per h1 request", False),
    ("cpu.h2", "CPU per h2 request", False),
]


def paired_comparison(data):
    """Per-request cost against HAProxy and nginx (issue 17 item 3: req/s >= 1.0x both as the
    median of interleaved rounds). Next to the ratio of medians, the ratio within each round
    (the targets of one round ran minutes apart, so they share more of the machine's state) and
    how many rounds weft won: when rounds disagree, the verdict is the machine's noise."""
    w = data.get("weft", {})
    rows = []
    for key, label, hib in PAIRED:
        for other in ("haproxy", "nginx"):
            o = data.get(other, {})
            r = ratio(w.get(key), o.get(key))
            if r is None:
                continue
            if not hib:
                r = 1 / r
            wr, orr = w.get(key + "@rounds"), o.get(key + "@rounds")
            per = []
            if isinstance(wr, list) and isinstance(orr, list):
                for a, b in zip(wr, orr):
                    if a is not None and b is not None and a > 0 and b > 0:
                        per.append(a / b if hib else b / a)
            if per:
                won = sum(1 for x in per if x >= 1.0)
                rounds = (
                    f"{statistics.median(per):.2f} [{min(per):.2f}–{max(per):.2f}] | {won}/{len(per)}"
                )
            else:
                rounds = "– | –"
            status = "met" if r >= 1.0 else "MISSED"
            if per and min(per) < 1.0 <= max(per):
                status += " (rounds disagree)"
            rows.append(f"| {label} | {other} | {r:.2f} | {rounds} | {status} |")
    if not rows:
        return []
    return [
        "Weft against HAProxy and nginx, per request (issue 17: at least 1.0× both; "
        "throughput as weft / other, CPU as other / weft, so above 1 is weft ahead):",
        "",
        "| metric | vs | ratio of medians | per-round ratio: median [min–max] | rounds weft ahead | status |",
        "|---|---|---:|---|---:|---|",
        *rows,
        "",
    ]


def report(res_path, meta_path, out_path):
    data = load(res_path)
    meta = json.loads(read(meta_path) or "{}")
    # Derived rows.
    direct_p50 = num(data.get("direct", {}).get("fix.p50"))
    for tname in TARGETS:
        t = data.setdefault(tname, {})
        if tname != "direct" and direct_p50 is not None and num(t.get("fix.p50")) is not None:
            t["fix.added_p50"] = t["fix.p50"] - direct_p50
        errs = []
        for p in ("fix", "sat", "h2", "conn", "tcpconn"):
            e = t.get(p + ".err")
            f = t.get(p + ".rps")
            errs.append("F" if isinstance(f, dict) else ("–" if e is None else str(e)))
        if any(x not in ("–",) for x in errs):
            t["errors"] = "/".join(errs)

    idle_n = meta.get("idle_n")
    rows = [
        (k, (f"RSS with {idle_n:,} idle keep-alive conns (MB)" if k == "rss.10k" and idle_n else label), *rest)
        for k, label, *rest in ROWS
    ]
    lines = []
    lines.append("# Weft load benchmark")
    lines.append("")
    for k in ("date", "commit", "cores", "load", "command", "mode", "pinning", "tools"):
        if k in meta:
            lines.append(f"- **{k}**: {meta[k]}")
    lines.append("")
    lines.append(
        "Cells: value, then in brackets the ratio to direct (`d`) and to HAProxy (`h`). "
        "For req/s and MB/s higher is better; for latency, CPU and RSS lower is better. "
        "`FAIL` = the case ran but produced no usable result (reason given); `–` = not applicable. "
        + (
            f"With {meta['rounds']} interleaved rounds a cell is the median, then [min–max] over the rounds; "
            "ratios are of medians. "
            if num(meta.get("rounds")) and meta["rounds"] > 1
            else ""
        )
        + "weft-mesh-mtls also shows its ratio to the plaintext weft-mesh (`m`)."
    )
    lines.append("")
    lines.append("| metric | " + " | ".join(TARGETS) + " |")
    lines.append("|---|" + "---|" * len(TARGETS))
    for key, label, unit, _hib, proxies_only in rows:
        cells = []
        for tname in TARGETS:
            t = data.get(tname, {})
            v = t.get(key)
            if proxies_only and tname == "direct":
                cells.append("–")
                continue
            s = fmt(v, unit) + spread(t, key, unit)
            if unit not in ("str",) and key not in ("fix.added_p50", "conn.inbound") and num(v) is not None:
                rs = []
                if tname != "direct":
                    r = ratio(v, data.get("direct", {}).get(key))
                    if r is not None:
                        rs.append(f"{r:.2f}d")
                if tname != "haproxy":
                    r = ratio(v, data.get("haproxy", {}).get(key))
                    if r is not None:
                        rs.append(f"{r:.2f}h")
                if tname == "weft-mesh-mtls":
                    r = ratio(v, data.get("weft-mesh", {}).get(key))
                    if r is not None:
                        rs.append(f"{r:.2f}m")
                if rs:
                    s += " (" + " ".join(rs) + ")"
            cells.append(s)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")

    # Goals from the benchmarks issue (goals, not assertions).
    w = data.get("weft", {})
    hp = data.get("haproxy", {})
    ng = data.get("nginx", {})
    goals = []

    def goal(name, ok, detail):
        mark = "n/a" if ok is None else ("met" if ok else "MISSED")
        goals.append(f"| {name} | {mark} | {detail} |")

    best = max([x for x in (num(hp.get("sat.rps")), num(ng.get("sat.rps"))) if x is not None], default=None)
    wr = num(w.get("sat.rps"))
    goal(
        "h1 req/s ≥ 1.1 × max(HAProxy, nginx)",
        None if wr is None or best is None else wr >= 1.1 * best,
        f"weft {fmt(wr, 'int')} vs 1.1 × {fmt(best, 'int')}",
    )
    ap = num(w.get("fix.added_p50"))
    goal("added p50 at fixed rate ≤ 0.2 ms", None if ap is None else ap <= 0.2, f"weft +{fmt(ap, 'ms')} ms")
    p99, hp99 = num(w.get("fix.p99")), num(hp.get("fix.p99"))
    goal(
        "p99 at fixed rate ≤ ½ HAProxy's",
        None if p99 is None or hp99 is None else p99 <= hp99 / 2,
        f"weft {fmt(p99, 'ms')} ms vs HAProxy {fmt(hp99, 'ms')} ms",
    )
    ri = num(w.get("rss.idle"))
    goal("idle RSS ≤ 10 MB", None if ri is None else ri <= 10, f"{fmt(ri, 'mb')} MB")
    r10 = num(w.get("rss.10k"))
    goal(f"RSS with {idle_n or 10000:,} idle conns ≤ 40 MB", None if r10 is None else r10 <= 40, f"{fmt(r10, 'mb')} MB")
    pm, mm = data.get("weft-mesh", {}), data.get("weft-mesh-mtls", {})
    pr, mr = num(pm.get("sat.rps")), num(mm.get("sat.rps"))
    goal(
        "mTLS mesh h1 req/s ≥ 0.7 × plaintext mesh",
        None if pr is None or mr is None else mr >= 0.7 * pr,
        f"weft-mesh-mtls {fmt(mr, 'int')} vs 0.7 × {fmt(pr, 'int')}"
        + (f" ({mr / pr:.2f}×)" if pr and mr else ""),
    )
    lines.append(
        "Goals for Weft, from the benchmarks issue (the `weft` column = the outbound sidecar; "
        "the last one compares weft-mesh-mtls with weft-mesh) — goals, not assertions:"
    )
    lines.append("")
    lines.append("| goal | status | measured |")
    lines.append("|---|---|---|")
    lines.extend(goals)
    lines.append("")
    lines.extend(paired_comparison(data))

    # The cost of mTLS: weft-mesh-mtls / weft-mesh, metric by metric.
    mt = []
    for key, label, unit, hib in (
        ("sat.rps", "HTTP/1.1 keep-alive saturation req/s", "int", True),
        ("fix.p50", "HTTP/1.1 fixed rate p50 (ms)", "ms", False),
        ("fix.p99", "HTTP/1.1 fixed rate p99 (ms)", "ms", False),
        ("h2.rps", "HTTP/2 req/s", "int", True),
        ("conn.rps", "new connections/s", "int", True),
        ("tcp.mbps", "TCP throughput (MB/s)", "int", True),
        ("tcpconn.rps", "TCP new connections/s (mTLS: a handshake each)", "int", True),
        ("cpu.sat", "CPU per request, h1 (µs, both sidecars)", "us", False),
        ("cpu.h2", "CPU per request, h2 (µs, both sidecars)", "us", False),
        ("cpu.tcpconn", "CPU per TCP connection (µs, both sidecars)", "us", False),
        ("rss.idle", "RSS idle (MB, both sidecars)", "mb", False),
        ("rss.load", "RSS under load (MB, both sidecars)", "mb", False),
    ):
        a, b = num(pm.get(key)), num(mm.get(key))
        r = ratio(b, a)
        rs = "–" if r is None else f"{r:.2f}×"
        if r is not None and key in ("sat.rps", "h2.rps", "tcp.mbps"):
            rs += " (≥ 0.7: " + ("met" if r >= 0.7 else "MISSED") + ")"
        mt.append(f"| {label} | {fmt(pm.get(key), unit)} | {fmt(mm.get(key), unit)} | {rs} |")
    if any(num(mm.get(k)) is not None for k in ("sat.rps", "h2.rps", "tcp.mbps")):
        lines.append("mTLS cost, sidecar to sidecar (weft-mesh-mtls / weft-mesh; target ≥ 0.7× for throughput):")
        lines.append("")
        lines.append("| metric | weft-mesh (plaintext) | weft-mesh-mtls | mTLS / plaintext |")
        lines.append("|---|---|---|---|")
        lines.extend(mt)
        lines.append("")

    notes = []
    for tname in TARGETS:
        for k, v in sorted(data.get(tname, {}).items()):
            if k.endswith(".errdetail"):
                notes.append(f"- {tname} {k[:-10]}: {v}")
            elif isinstance(v, dict) and "fail" in v:
                notes.append(f"- {tname} {k}: FAILED: {v['fail']}")
            elif k.endswith("@fails"):
                notes.append(f"- {tname} {k[:-6]}: failed in some rounds (median of the others): " + "; ".join(v))
    for tname in TARGETS:
        cc = num(data.get(tname, {}).get("tcpconn.client_cpu"))
        if cc is not None and cc >= 0.9:
            notes.append(
                f"- {tname} tcpconn: the client (tcp_conns.py) used {cc:.0%} of its CPU: "
                "the rate may be the client's limit, not the target's"
            )
    for n in meta.get("notes", []):
        notes.append(f"- {n}")
    if notes:
        lines.append("Notes and errors:")
        lines.append("")
        lines.extend(notes)
        lines.append("")

    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- main


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "cpu":
        print(cpu_ticks(args))
    elif cmd == "cpu-user":
        print(cpu_ticks(args, user_only=True))
    elif cmd == "clk-tck":
        print(CLK_TCK)
    elif cmd == "rss":
        print(rss_kb(args))
    elif cmd == "sample-rss":
        out, secs, pids = args[0], float(args[1]), args[2:]
        best = 0
        end = time.monotonic() + secs
        while time.monotonic() < end:
            best = max(best, rss_kb(pids))
            time.sleep(0.2)
        with open(out, "w") as f:
            f.write(str(best))
    elif cmd == "children":
        print(" ".join(map(str, children(args[0]))))
    elif cmd == "put":
        v = args[3]
        try:
            v = float(v)
        except ValueError:
            pass
        put(args[0], args[1], args[2], v)
    elif cmd == "fail":
        fail(args[0], args[1], args[2], " ".join(args[3:]))
    elif cmd == "get":
        v = load(args[0]).get(args[1], {}).get(args[2])
        print("" if v is None or isinstance(v, dict) else v)
    elif cmd == "wrk":
        parse_wrk(*args)
    elif cmd == "oha":
        parse_oha(*args)
    elif cmd == "h2load":
        parse_h2load(*args)
    elif cmd == "iperf":
        parse_iperf(*args)
    elif cmd == "tcpconns":
        parse_tcpconns(*args)
    elif cmd == "merge":
        merge(*args)
    elif cmd == "report":
        report(*args)
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
