#!/usr/bin/env python3
"""Splits one-connection request time into windows from `perf script` output of syscall
tracepoints (and, with --sched, sched_switch events of every CPU). Used by
scripts/latency-split.sh; see there.

Windows, per request, on the proxy's threads (the two busiest sockets: the client's receives
the larger reads):
  A  client recvfrom  -> upstream writev   (the request side)
  B  upstream writev  -> upstream recvfrom (the upstream's answer, and the wake-ups around it)
  C  upstream recvfrom -> client writev    (the answer side)
  D  client writev    -> next client recvfrom
"""
import bisect
import collections
import re
import statistics as st
import sys

LINE = re.compile(r'\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)')


def parse(path):
    ev = []
    with open(path, errors='replace') as f:
        for line in f:
            m = LINE.match(line)
            if m:
                ev.append((float(m.group(4)), m.group(1).strip(), int(m.group(2)),
                           int(m.group(3)), m.group(5).split(':')[-1], m.group(6)))
    ev.sort(key=lambda e: e[0])
    return ev


def windows(ev, pid_tids):
    pend, seq = {}, []
    for t, comm, tid, cpu, kind, args in ev:
        if tid not in pid_tids:
            continue
        if kind == 'sys_enter_recvfrom':
            pend[tid] = int(re.search(r'fd: (0x[0-9a-f]+)', args).group(1), 16)
        elif kind == 'sys_exit_recvfrom':
            fd = pend.pop(tid, None)
            a = args.strip()
            ret = int(a, 16) if a.startswith('0x') else int(a)
            if fd is not None and ret > 0:
                seq.append((t, 'r', fd, ret))
        elif kind == 'sys_enter_writev':
            seq.append((t, 'w', int(re.search(r'fd: (0x[0-9a-f]+)', args).group(1), 16), 0))
    sizes = collections.defaultdict(list)
    for t, k, fd, n in seq:
        if k == 'r':
            sizes[fd].append(n)
    fds = sorted(sizes, key=lambda f: -len(sizes[f]))[:2]
    if len(fds) < 2:
        sys.exit('fewer than two sockets seen')
    client = max(fds, key=lambda f: st.median(sizes[f]))
    up = min(fds, key=lambda f: st.median(sizes[f]))
    marks = []
    for t, k, fd, n in seq:
        w = {('r', client): 'A', ('w', up): 'B', ('r', up): 'C', ('w', client): 'D'}.get((k, fd))
        if w:
            marks.append((t, w))
    wins = {w: [] for w in 'ABCD'}
    for (t0, w), (t1, w1) in zip(marks, marks[1:]):
        if 'ABCDA'['ABCD'.index(w) + 1] == w1:
            wins[w].append((t0, t1))
    return wins


def main():
    path, name = sys.argv[1], sys.argv[2]
    sched = '--sched' in sys.argv
    ev = parse(path)
    comm_of = {}
    for t, comm, tid, cpu, kind, args in ev:
        comm_of.setdefault(tid, comm)
    # The proxy's threads: those that made the recvfrom/writev calls on the two busiest sockets
    # and are not nginx or the load tool.
    tids = {tid for t, comm, tid, cpu, kind, args in ev
            if kind in ('sys_enter_writev', 'sys_enter_recvfrom')
            and comm not in ('nginx', 'wrk', 'python3', 'perf')}
    wins = windows(ev, tids)
    f = lambda xs: f"{st.median(xs) * 1e6:6.1f}" if xs else '     -'
    lens = {w: [b - a for a, b in wins[w]] for w in 'ABCD'}
    print(f"{name:<14} median us: request side (A) {f(lens['A'])}, upstream (B) {f(lens['B'])}, "
          f"answer side (C) {f(lens['C'])}, client (D) {f(lens['D'])}; "
          f"A+C {f([a + c for a, c in zip(lens['A'], lens['C'])])}; n={len(lens['A'])}")
    if not sched:
        return
    # Who held each CPU during the windows, per request (sched_switch of every CPU).
    run = collections.defaultdict(list)
    cur = {}
    for t, comm, tid, cpu, kind, args in ev:
        if kind != 'sched_switch':
            continue
        m = re.search(r'next_comm=(.+?) next_pid=(\d+)', args)
        if cpu in cur:
            run[cpu].append((cur[cpu][0], t, cur[cpu][1]))
        nxt = m.group(1)
        who = 'idle' if nxt.startswith('swapper') else (
            'proxy' if int(m.group(2)) in tids else re.sub(r'[/:].*', '', nxt))
        cur[cpu] = (t, who)
    for w in 'ABCD':
        tot = collections.Counter()
        for cpu, rs in run.items():
            starts = [r[0] for r in rs]
            for a, b in wins[w]:
                i = max(0, bisect.bisect_right(starts, a) - 1)
                while i < len(rs) and rs[i][0] < b:
                    s, e, who = rs[i]
                    ov = min(e, b) - max(s, a)
                    if ov > 0:
                        tot[who] += ov
                    i += 1
        n = max(1, len(wins[w]))
        share = ', '.join(f"{k} {v / n * 1e6:.1f}" for k, v in tot.most_common(5))
        print(f"  {w}: CPU time held per request (us, both CPUs): {share}")


if __name__ == '__main__':
    main()
