#!/usr/bin/env python3
"""The code a request runs, as the instruction cache sees it: from a callgrind run made with
--dump-instr=yes --compress-pos=no (and --cache-sim=yes for the misses), the instructions of
BINARY executed at least every other request on average ("hot"), their bytes, the 64-byte lines
they touch, and the fewest lines those bytes could fill ("ideal": the bytes laid out end to
end). Lines touched over ideal is the layout's waste: hot blocks interleaved with code the
request does not run (error paths, other states, branches the compiler could not know were
rare). When the hot code is larger than the L1 instruction cache (32 KiB: 512 lines), every
line touched misses once a request, and the I1 misses are about the lines touched.

    callgrind-lines.py OUT N [TOP]

OUT is the callgrind output (OUT.dis, `objdump -d --no-show-raw-insn BINARY`, is read
beside it: scripts/callgrind-footprint.py writes it); N the requests in the run (the calls
of the bench's `request()`); TOP > 0 also lists the functions with the most I1 misses, with
their lines touched, ideal lines, hot bytes and instructions per request. Used by
scripts/callgrind-stack.sh (SIM=1); see docs/benchmarks.md, "the stack's code footprint
(hc20)".
"""
import bisect, collections, re, sys

out, n = sys.argv[1], float(sys.argv[2])
top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
addrs, fn_of, fn = [], {}, None
with open(out + ".dis", errors="replace") as f:
    for line in f:
        m = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if m:
            fn = m.group(2)
            continue
        m = re.match(r"^\s+([0-9a-f]+):", line)
        if m:
            a = int(m.group(1), 16)
            addrs.append(a)
            fn_of[a] = fn
addrs.sort()


def length(a):
    i = bisect.bisect_right(addrs, a)
    return min(addrs[i] - a, 15) if i < len(addrs) else 4


# Exclusive Ir and I1mr at each instruction of the profiled binary (the cost line after
# `calls=` is a call's inclusive cost, not the instruction's own).
names, obj, skip = {}, "", False
events = []
ir, i1 = collections.Counter(), collections.Counter()
with open(out, errors="replace") as f:
    for line in f:
        if line.startswith("events:"):
            events = line.split()[1:]
            continue
        if line.startswith(("ob=", "fn=", "cob=", "cfn=", "fl=", "fi=", "fe=", "cfi=", "cfl=")):
            key, _, rest = line.rstrip("\n").partition("=")
            m = re.match(r"\((\d+)\)(?: (.*))?$", rest)
            name = rest
            if m:
                if m.group(2) is not None:
                    names[(key.lstrip("c"), m.group(1))] = m.group(2)
                name = names.get((key.lstrip("c"), m.group(1)), rest)
            if key == "ob":
                obj = name
            continue
        if line.startswith("calls="):
            skip = True
            continue
        if line.startswith("0x"):
            if skip:
                skip = False
                continue
            parts = line.split()
            a = int(parts[0], 16)
            if a not in fn_of:
                continue
            vals = parts[2:]
            ir[a] += int(vals[0])
            if "I1mr" in events and len(vals) > events.index("I1mr"):
                i1[a] += int(vals[events.index("I1mr")])
per = collections.defaultdict(lambda: [0, set(), 0.0, 0.0])
lines = set()
for a, c in ir.items():
    if c < n / 2:
        continue
    p = per[fn_of[a]]
    size = length(a)
    p[0] += size
    for b in range(a >> 6, ((a + size - 1) >> 6) + 1):
        p[1].add(b)
        lines.add(b)
    p[2] += c / n
for a, c in i1.items():
    per[fn_of[a]][3] += c / n
hot = sum(p[0] for p in per.values())
print("    lines: hot code %d bytes, %d lines touched, ideal %d (%.2fx), I1 misses %.0f (per request; %d requests)"
      % (hot, len(lines), (hot + 63) // 64, len(lines) / max(1, (hot + 63) // 64),
         sum(p[3] for p in per.values()), n))
if top:
    print("    %7s %6s %6s %6s %7s  function" % ("I1mr", "lines", "ideal", "bytes", "Ir"))
    for name, p in sorted(per.items(), key=lambda kv: -kv[1][3])[:top]:
        print("    %7.1f %6d %6d %6d %7.0f  %s"
              % (p[3], len(p[1]), (p[0] + 63) // 64, p[0], p[2], name[:120]))
