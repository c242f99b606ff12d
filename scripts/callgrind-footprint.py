#!/usr/bin/env python3
"""The footprint of a callgrind run made with --cache-sim=yes --branch-sim=yes --dump-instr=yes
--compress-pos=no, per request: I1 misses, D1 read and write misses, mispredicted conditional
and indirect branches, and the locked read-modify-write instructions executed (`lock`-prefixed
or `xchg` with memory, found in `objdump -d` of BINARY; exclusive counts of BINARY's own
instructions, whole run).

    callgrind-footprint.py [--row FUNCTION] OUT BINARY REQUESTS TOP

--row FUNCTION: the misses are that function's inclusive row (e.g. criterion's
`Bencher<M>::iter`), else the whole run's totals; all are divided by REQUESTS. TOP > 0 also
lists the functions with the most locked instructions per request.

Then the code a request runs, as the instruction cache sees it ("lines:"): the instructions of
BINARY executed at least every other request on average (hot), their bytes, the 64-byte lines
they touch and the fewest lines those bytes could fill (ideal: laid out end to end). Lines
touched over ideal is the layout's waste: hot blocks interleaved with code the request does
not run (error paths, other states, branches the compiler could not know were rare). Hot code
larger than the L1 instruction cache (32 KiB, 512 lines) misses once a line a request: the I1
misses are then about the lines touched. With TOP, by function (most I1 misses first). Used by
scripts/callgrind-stack.sh and scripts/callgrind-miss.sh (SIM=1); see the former for what
the numbers meant on this project's hot path.
"""
import collections, re, sys
args = sys.argv[1:]
row_name = None
if args and args[0] == "--row":
    row_name, args = args[1], args[2:]
out, binary, n, top = args[0], args[1], int(args[2]), int(args[3])
import subprocess
with open(out + ".dis", "w") as dis:
    subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], stdout=dis, check=True)
with open(out + ".sim", "w") as sim:
    subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                    "--show=Ir,I1mr,D1mr,D1mw,Bcm,Bim", out], stdout=sim,
                   stderr=subprocess.DEVNULL, check=True)
# Locked read-modify-write instructions of the binary, by address, with their function.
locked, fn, fn_of = {}, None, {}
with open(out + ".dis", errors="replace") as f:
    for line in f:
        m = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if m:
            fn = m.group(2)
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)(\s+(.*))?$", line)
        if m:
            fn_of[int(m.group(1), 16)] = fn
        if m and (m.group(2) == "lock" or (m.group(2).startswith("xchg") and "(" in (m.group(4) or ""))):
            locked[int(m.group(1), 16)] = fn
# Exclusive Ir at each instruction of the binary's object (positions "instr line", absolute;
# the cost line after `calls=` is a call's inclusive cost, not the instruction's own).
names, obj, skip, per_fn, total = {}, "", False, collections.Counter(), 0
events, ir_at, i1_at = [], collections.Counter(), collections.Counter()
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
        m = re.match(r"^0x([0-9a-f]+) \S+ (\d+)", line)
        if m:
            if skip:
                skip = False
                continue
            if obj.endswith(binary.split("/")[-1]):
                addr = int(m.group(1), 16)
                costs = line.split()[2:]
                ir_at[addr] += int(costs[0])
                if "I1mr" in events and len(costs) > events.index("I1mr"):
                    i1_at[addr] += int(costs[events.index("I1mr")])
                if addr in locked:
                    total += int(m.group(2))
                    per_fn[locked[addr]] += int(m.group(2))
# Per-request misses: the inclusive row of ROW (a function) in the annotation, or without
# --row the whole profile's totals (its "PROGRAM TOTALS" line).
row = None
with open(out + ".sim", errors="replace") as f:
    for line in f:
        if (row_name and row_name in line) or (not row_name and "PROGRAM TOTALS" in line):
            row = [int(v.replace(",", "")) for v in re.findall(r"([\d,]+) \(", line)]
            break
if row is None or len(row) < 6:
    sys.exit("no %s row in the simulated profile" % (row_name or "PROGRAM TOTALS"))
ir, i1, d1r, d1w, bcm, bim = row[:6]
print("    footprint: I1mr %.0f  D1mr %.0f  D1mw %.0f  Bcm %.0f  Bim %.0f  locked %.1f  (per request; Ir %.0f)"
      % (i1 / n, d1r / n, d1w / n, bcm / n, bim / n, total / n, ir / n))
if top:
    print("    locked instructions per request, by function:")
    for name, c in per_fn.most_common(top):
        print("    %8.2f  %s" % (c / n, name[:140]))
# The hot code's bytes and lines (see the top): an instruction's length is the distance to
# the next one in the disassembly.
starts = sorted(fn_of)
size_at = {a: min(b - a, 15) for a, b in zip(starts, starts[1:])}
hot_fn = collections.defaultdict(lambda: [0, set(), 0.0, 0.0])
touched = set()
for addr, c in ir_at.items():
    if c < n / 2 or addr not in fn_of:
        continue
    p = hot_fn[fn_of[addr]]
    size = size_at.get(addr, 4)
    p[0] += size
    for line_no in range(addr >> 6, ((addr + size - 1) >> 6) + 1):
        p[1].add(line_no)
        touched.add(line_no)
    p[2] += c / n
for addr, c in i1_at.items():
    if addr in fn_of:
        hot_fn[fn_of[addr]][3] += c / n
hot_bytes = sum(p[0] for p in hot_fn.values())
ideal = (hot_bytes + 63) // 64
print("    lines: hot code %d bytes, %d lines touched, ideal %d (%.2fx); %d requests"
      % (hot_bytes, len(touched), ideal, len(touched) / max(1, ideal), n))
if top:
    print("    by I1 misses, per request: I1mr, lines touched, ideal, hot bytes, Ir")
    for name, p in sorted(hot_fn.items(), key=lambda kv: -kv[1][3])[:top]:
        print("    %7.1f %5d %5d %6d %7.0f  %s"
              % (p[3], len(p[1]), (p[0] + 63) // 64, p[0], p[2], name[:120]))
