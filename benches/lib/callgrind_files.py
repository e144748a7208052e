#!/usr/bin/env python3
"""Self cost of a callgrind dump by source file and by crate, inlined code included.

A release build inlines most of the request path into a few large functions, so callgrind's
per-function view says little. The dump's line records still name the source file of every
inlined line (`fi=` / `fe=`), so this sums the self cost per source file and per crate (the
`name-version` directory of a registry crate, `std` for the standard library, the workspace
path otherwise).

    callgrind_files.py DUMP [REQUESTS] [TOP]

prints the top TOP (default 40) files and all crates with their share, and instructions per
request when REQUESTS is given.
"""

import re
import sys
from collections import defaultdict


def crate_of(path):
    m = re.search(r"/registry/src/[^/]+/([^/]+)/", path)
    if m:
        return m.group(1)
    if "/rustc/" in path or "/library/" in path:
        return "std"
    m = re.search(r"/work/[^/]+/([^/]+/src/[^/]+)", path)
    if m:
        return m.group(1)
    return path if path.startswith("???") else path.split("/")[-1]


def main():
    dump = sys.argv[1]
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    names = {}
    by_file = defaultdict(int)
    fl = cur = "???"
    skip_next = False
    total = 0

    def name(kind_value):
        # "(n) name" defines n; "(n)" refers to it.
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", kind_value)
        if not m:
            return kind_value
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), "???")

    with open(dump, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                if skip_next:
                    skip_next = False
                    continue
                if len(parts) >= 2:
                    try:
                        cost = int(parts[1])
                    except ValueError:
                        continue
                    by_file[cur] += cost
                    total += cost
                continue
            key, _, value = line.partition("=")
            if key == "fl":
                fl = cur = name(value)
            elif key in ("fi", "fe"):
                cur = name(value)
            elif key == "fn":
                cur = fl
            elif key == "calls":
                skip_next = True
            elif key in ("cfi", "cfl", "cfn", "cob", "ob"):
                name(value)
    crates = defaultdict(int)
    for path, cost in by_file.items():
        crates[crate_of(path)] += cost
    per = (lambda v: f"{v / requests:10.0f}/req") if requests else (lambda v: "")
    print(f"total self cost {total:,}" + (f" = {total / requests:,.0f} per request" if requests else ""))
    print("\nby crate:")
    for k, v in sorted(crates.items(), key=lambda kv: -kv[1]):
        if v * 1000 < total:
            continue
        print(f"  {v / total * 100:5.1f}% {per(v)}  {k}")
    print(f"\ntop {top} source files:")
    for k, v in sorted(by_file.items(), key=lambda kv: -kv[1])[:top]:
        short = re.sub(r".*/registry/src/[^/]+/", "", k)
        short = re.sub(r".*/rustc/[0-9a-f]+/library/", "std:", short)
        print(f"  {v / total * 100:5.1f}% {per(v)}  {short}")


if __name__ == "__main__":
    main()
