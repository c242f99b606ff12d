#!/usr/bin/env bash
# Where a request's CPU goes on the whole machine, not only in the proxy: for each proxy
# configuration, rounds of `wrk -c CONNS` with distinct ~2 KB prompts (misses), and per
# request, from the kernel's own counters read before and after each wrk run:
#
#   serve   the proxy's runtime thread (its main thread: `--worker-threads 1`, the current-thread
#           scheduler of scripts/bench-proxy.sh), from /proc/PID/task/TID/schedstat (ns on CPU)
#   other   the proxy's other threads (Tokio's blocking pool: the disk store's writes)
#   wait    the runtime thread's time runnable but not running (schedstat's run-queue wait:
#           the other core's work taking its CPU shows here)
#   wrk     the load generator (its rusage, wait4)
#   up      the upstream nginx worker
#   kthr    kernel threads (children of kthreadd: kworkers, ksoftirqd, writeback, kdamond;
#           one that exits during the row is not counted)
#   sum     serve + other + wrk + up + kthr: what the row's own processes cost the machine (on a
#           saturated host, throughput goes as its inverse)
#   busy    the machine's busy time (/proc/stat: every CPU, all but idle and iowait), which
#           also counts whatever else runs on the host (compare rounds of one run)
#   idle    the machine's idle + iowait time; irq, steal, iowait: parts of busy and idle
#           (irq and softirq; time the hypervisor ran something else; idle with I/O pending)
#   vcsw, icsw   the runtime thread's voluntary / involuntary context switches (per 1,000)
#   flt     the proxy's minor faults (per 1,000), and /proc/vmstat's nr_dirtied, nr_written,
#           pgfault and thp_fault_alloc counters (per 1,000; nr_* in pages)
#   ipi-res, ipi-cal, tlb, blk-irq   /proc/interrupts: rescheduling and function-call IPIs, TLB
#           shootdowns and the virtio block device's interrupts, every CPU (per 1,000)
#
#   CONNS=32 ROUNDS=5 DURATION=3 NO_BUILD=1 PROXY_BIN=/tmp/s0/claude-proxy \
#     PROXY_CONFIGS="off:--cache-mode off;disk:--cache-mode all" scripts/machine-split.sh
#   PROXY_CONFIGS="b-disk@/tmp/old/claude-proxy:--cache-mode all;disk:--cache-mode all" ...
#
# The load is benches/proxy/distinct.lua (`wrk -t1`). Every proxy runs with `--worker-threads 1`.
# The targets run side by side (one upstream), each started in a directory of its own (the
# disk store's default `--cache-path` is there), each warmed by WARMUP seconds of the load
# before the first round; round r measures them in an order rotated by r - 1. Medians of the
# rounds at the end. Counters are read by a small Python driver; no perf needed.
#
# GAP=SECONDS: every proxy idles that long before each row. scripts/bench-proxy.sh's rounds
# leave each proxy idle while the other targets run (~12 s with five targets of 3 s), longer
# than Tokio's blocking-pool threads live idle (10 s): with GAP=11 the disk store's writer
# thread is a new one at the start of every row, as there.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-upstream.sh
. scripts/bench-upstream.sh

# DURATION (3), CONNS (32), ROUNDS (5), WARMUP (1) and GAP (0) are read by the driver below.
PROXY_CONFIGS="${PROXY_CONFIGS:-off:--cache-mode off;memory:--cache-mode all --cache-path memory;disk:--cache-mode all}"
need_tools nginx wrk python3
proxy_bin
bench_setup
start_upstream
up_master="${pids[-1]}"

targets=()
IFS=';' read -r -a configs <<<"$PROXY_CONFIGS"
for entry in "${configs[@]}"; do
  config_dir "$entry"
  # shellcheck disable=SC2086 # flags are words
  (cd "$dir" && exec env -u ANTHROPIC_API_KEY -u ANTHROPIC_API_KEYS RUST_LOG="${PROXY_LOG:-warn}" \
      "$bin" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up_port" --worker-threads 1 \
      $flags >"$dir/log" 2>&1) &
  pids+=($!)
  wait_port "$port"
  targets+=("$name=$!=$port")
done
echo "claude-proxy: $PROXY_BIN; $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$up_master" "${targets[@]}" <<'PY'
import os, statistics, subprocess, sys, time

env = os.environ.get
duration, conns, rounds = env("DURATION", "3"), env("CONNS", "32"), int(env("ROUNDS", "5"))
warmup, gap = env("WARMUP", "1"), float(env("GAP", "0"))
print(f"wrk -t1 -c{conns} -d{duration}s, {rounds} rounds, {warmup}s warm-up per target, {gap:g}s idle before each row")
targets = []
for t in sys.argv[2:]:
    name, pid, port = t.split("=")
    targets.append((name, int(pid), port))
lua = os.path.abspath("benches/proxy/distinct.lua")

def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    s = f.read()
                if int(s[s.rindex(")") + 2:].split()[1]) == pid:
                    out.append(int(p))
            except (OSError, ValueError):
                pass
    return out

def upstream_workers():
    # The upstream's nginx workers: the children of its master process.
    return children(int(sys.argv[1]))

def schedstat(path):
    try:
        run, wait, _ = open(path).read().split()
        return int(run), int(wait)
    except OSError:
        return 0, 0

def ctxt(path):
    v = n = 0
    try:
        for line in open(path):
            if line.startswith("voluntary_ctxt_switches"):
                v = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                n = int(line.split()[1])
    except OSError:
        pass
    return v, n

def minflt(pid):
    s = open(f"/proc/{pid}/stat").read()
    return int(s[s.rindex(")") + 2:].split()[7])

def kthreads():
    total = 0
    for p in children(2):
        total += schedstat(f"/proc/{p}/schedstat")[0]
    return total

def cpustat():
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, idle, v[5] + v[6], v[7], v[4]  # jiffies: busy, idle, irq, steal, iowait

def interrupts():
    # Rescheduling and function-call IPIs, TLB shootdowns, and the block device's interrupts
    # (virtio-blk's request queues), summed over the CPUs.
    d = {"res": 0, "cal": 0, "tlb": 0, "blk": 0}
    for line in open("/proc/interrupts"):
        f = line.split()
        if not f:
            continue
        counts = sum(int(x) for x in f[1:] if x.isdigit())
        key = f[0].rstrip(":")
        if key in ("RES", "CAL", "TLB"):
            d[key.lower()] = counts
        elif "virtio" in line and "-req" in line:
            d["blk"] += counts
    return d

VM = ("nr_dirtied", "nr_written", "pgfault", "thp_fault_alloc")
def vmstat():
    d = {}
    for line in open("/proc/vmstat"):
        k, v = line.split()
        if k in VM:
            d[k] = int(v)
    return d

ups = upstream_workers()
def snap(pid):
    serve = schedstat(f"/proc/{pid}/task/{pid}/schedstat")
    other = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) != pid:
            other += schedstat(f"/proc/{pid}/task/{tid}/schedstat")[0]
    return {
        "serve": serve[0], "wait": serve[1], "other": other,
        "csw": ctxt(f"/proc/{pid}/task/{pid}/status"),
        "flt": minflt(pid),
        "up": sum(schedstat(f"/proc/{u}/schedstat")[0] for u in ups),
        "kthr": kthreads(), "cpu": cpustat(), "vm": vmstat(), "irq": interrupts(), "t": time.monotonic(),
    }

def wrk(port, secs):
    p = subprocess.Popen(["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "-s", lua, f"http://127.0.0.1:{port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    reqs = 0
    for line in out.splitlines():
        if "requests in" in line:
            reqs = int(line.split()[0])
    return reqs, (ru.ru_utime + ru.ru_stime) * 1e9

for name, pid, port in targets:
    wrk(port, warmup)

hz = os.sysconf("SC_CLK_TCK")
cols = ["req/s", "serve", "other", "wait", "wrk", "up", "kthr", "sum", "busy", "idle", "irq", "steal", "iowait", "vcsw", "icsw", "flt",
        "dirtied", "written", "pgfault", "thp", "ipi-res", "ipi-cal", "tlb", "blk-irq"]
rows = {name: [] for name, _, _ in targets}
print(f"{'round':>5} {'target':10} " + " ".join(f"{c:>8}" for c in cols))
for r in range(rounds):
    order = targets[r % len(targets):] + targets[:r % len(targets)]
    for name, pid, port in order:
        time.sleep(gap)
        a = snap(pid)
        n, wrk_ns = wrk(port, duration)
        b = snap(pid)
        el = b["t"] - a["t"]
        us = lambda ns: ns / n / 1e3
        k = 1000 / n
        row = [n / el, us(b["serve"] - a["serve"]), us(b["other"] - a["other"]), us(b["wait"] - a["wait"]),
               us(wrk_ns), us(b["up"] - a["up"]), us(b["kthr"] - a["kthr"]),
               us(b["serve"] - a["serve"] + b["other"] - a["other"] + b["up"] - a["up"] + b["kthr"] - a["kthr"] + wrk_ns),
               (b["cpu"][0] - a["cpu"][0]) / hz * 1e6 / n, (b["cpu"][1] - a["cpu"][1]) / hz * 1e6 / n,
               (b["cpu"][2] - a["cpu"][2]) / hz * 1e6 / n, (b["cpu"][3] - a["cpu"][3]) / hz * 1e6 / n,
               (b["cpu"][4] - a["cpu"][4]) / hz * 1e6 / n,
               (b["csw"][0] - a["csw"][0]) * k, (b["csw"][1] - a["csw"][1]) * k, (b["flt"] - a["flt"]) * k]
        row += [(b["vm"].get(v, 0) - a["vm"].get(v, 0)) * k for v in VM]
        row += [(b["irq"][v] - a["irq"][v]) * k for v in ("res", "cal", "tlb", "blk")]
        rows[name].append(row)
        print(f"{r + 1:>5} {name:10} " + " ".join(f"{x:8.1f}" for x in row), flush=True)
print(f"\nmedians of {rounds} rounds (µs per request; vcsw and the columns after it per 1,000 requests)")
print(f"{'':5} {'target':10} " + " ".join(f"{c:>8}" for c in cols))
base = None
for name, _, _ in targets:
    med = [statistics.median(x[j] for x in rows[name]) for j in range(len(cols))]
    print(f"{'':5} {name:10} " + " ".join(f"{x:8.1f}" for x in med))
first = targets[0][0]
print(f"\nreq/s against {first}, round by round:")
for name, _, _ in targets[1:]:
    ratios = [a[0] / b[0] for a, b in zip(rows[name], rows[first])]
    print(f"  {name:10} median {statistics.median(ratios):.2f} (" + ", ".join(f"{x:.2f}" for x in ratios) + ")")
PY
