#!/usr/bin/env python3
"""The best time the scale scenario's limits allow a client that serves tasks in arrival order
(issue 12, docs/benchmarks.md "Scale"): each task goes to the key whose three buckets hold it
soonest and is sent the instant they do, knowing the server's buckets exactly (continuous
refill, capacity = the per-minute limit, max_tokens reserved at admission and the unused part
given back when the answer ends LAT s later), at most C in flight. Task sizes are drawn like
`loadgen fleet`'s (100-500 input tokens, max_tokens 300-1500; another generator, so the
numbers are a distribution over 20 seeds, not the exact tasks of a run).

    python3 scripts/fifo-bound.py
"""
import random, heapq
def run(K=2, n=400, rpm=120, itpm=40000, otpm=8000, lat=0.5, out=60, C=32, seed=1):
    rnd = random.Random(seed)
    tasks = [(rnd.randint(100, 500), rnd.randint(300, 1500)) for _ in range(n)]
    cap = [rpm, itpm, otpm]; rate = [c / 60 for c in cap]
    lvl = [cap[:] for _ in range(K)]
    t = 0.0; ends = []
    def adv(to):
        nonlocal t
        while True:
            stop = ends and ends[0][0] <= to
            nxt = ends[0][0] if stop else to
            for k in range(K):
                for i in range(3): lvl[k][i] = min(cap[i], lvl[k][i] + rate[i] * (nxt - t))
            t = nxt
            if stop:
                _, k, back = heapq.heappop(ends); lvl[k][2] = min(cap[2], lvl[k][2] + back)
            else:
                return
    last = 0
    for inp, mt in tasks:
        need = [1, inp, mt]
        while True:
            if len(ends) >= C: adv(ends[0][0]); continue
            ws = [max(max(0, (need[i] - lvl[k][i]) / rate[i]) for i in range(3)) for k in range(K)]
            k = min(range(K), key=lambda k: ws[k]); w = ws[k]
            if w <= 1e-9: break
            nxt = t + w
            if ends and ends[0][0] < nxt: adv(ends[0][0])
            else: adv(nxt)
        for i in range(3): lvl[k][i] -= need[i]
        heapq.heappush(ends, (t + lat, k, mt - out)); last = t + lat
    return last
for K, n, C in ((1, 200, 16), (2, 400, 32), (4, 800, 64)):
    for lat in (0.0, 0.5):
        r = [run(K=K, n=n, C=C, lat=lat, seed=s) for s in range(1, 21)]
        print(f"{K} keys, {n} tasks, latency {lat}: mean {sum(r)/len(r):.1f} s, min {min(r):.1f}, max {max(r):.1f}")
