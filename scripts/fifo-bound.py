#!/usr/bin/env python3
"""The best time the scale scenario's limits allow a client that serves tasks in arrival order
(issue 12, docs/benchmarks.md "Scale"): each task goes to the key whose three buckets hold it
soonest and is sent the instant they do, knowing the server's buckets exactly (continuous
refill, capacity = the per-minute limit, max_tokens reserved at admission and the unused part
given back when the answer ends LAT s later), at most C in flight. Task sizes are drawn like
`loadgen fleet`'s (100-500 input tokens, max_tokens 300-1500; another generator, so the
numbers are a distribution over 20 seeds, not the exact tasks of a run).

    python3 scripts/fifo-bound.py
    python3 scripts/fifo-bound.py --harness   # the exact tasks of scripts/scale-bench.sh
    python3 scripts/fifo-bound.py --slow      # the same tasks, slower answers, the raise
    python3 scripts/fifo-bound.py --lag       # seeds 1-5, with the probe and the floor's lag

With `--harness` the tasks are those `loadgen fleet` sends (`testing::scale::fleet_task`:
fleet f draws with fastrand seeded `f * 1_000_003 ^ i`, reproduced below), the fleets'
tasks interleaved in turn; it also prints the bound's admission times per key and the
bound over random interleavings of the fleets.
"""
import random, heapq, sys

M64 = (1 << 64) - 1
class WyRand:
    """fastrand 2.x's generator (wyrand) and its `u64(a..=b)` (Lemire's reduction)."""
    def __init__(self, seed): self.s = seed & M64
    def next(self):
        self.s = (self.s + 0x2D358DCCAA6C78A5) & M64
        t = self.s * (self.s ^ 0x8BB84B93962EACC9)
        return (t & M64) ^ (t >> 64)
    def u64(self, lo, hi):
        n = hi - lo + 1
        r = self.next(); m = r * n
        if (m & M64) < n:
            t = ((-n) & M64) % n
            while (m & M64) < t:
                r = self.next(); m = r * n
        return lo + (m >> 64)

def harness_tasks(fleets, per_fleet=200):
    """(input tokens, max_tokens) of `fleet_task(_, "f{f}", f, i)`, fleets taking turns."""
    out = []
    for i in range(per_fleet):
        for f in range(1, fleets + 1):
            rng = WyRand(((f * 1_000_003) & M64) ^ i)
            inp = rng.u64(100, 500)
            out.append((inp, rng.u64(300, 1500)))
    return out

def run(K=2, n=400, rpm=120, itpm=40000, otpm=8000, lat=0.5, out=60, C=32, seed=1, tasks=None, adm=None, raise_at=None, factor=4, probe=False, lag=0.0):
    """`probe`: each key's first task goes alone and the key's others wait for its answer.
    `lag`: at that answer the key's levels lose `lag` seconds of refill, for good (a client
    that learns the buckets from the answers' counts and cannot credit the refill between
    the server's count and the answer: the count may be as late as the answer)."""
    if tasks is None:
        rnd = random.Random(seed)
        tasks = [(rnd.randint(100, 500), rnd.randint(300, 1500)) for _ in range(n)]
    cap = [rpm, itpm, otpm]; rate = [c / 60 for c in cap]
    lvl = [cap[:] for _ in range(K)]
    t = 0.0; ends = []
    probed, learned = [not probe] * K, [not probe] * K
    def adv(to):
        nonlocal t, raise_at
        if raise_at is not None and to >= raise_at:
            # The limits rise (times `factor`), the levels with them (as MockClaude::set_limits).
            r, raise_at = raise_at, None
            adv(r)
            for k in range(K):
                for i in range(3): lvl[k][i] += cap[i] * (factor - 1)
            for i in range(3): cap[i] *= factor; rate[i] *= factor
        while True:
            stop = ends and ends[0][0] <= to
            nxt = ends[0][0] if stop else to
            for k in range(K):
                for i in range(3): lvl[k][i] = min(cap[i], lvl[k][i] + rate[i] * (nxt - t))
            t = nxt
            if stop:
                _, k, back = heapq.heappop(ends); lvl[k][2] = min(cap[2], lvl[k][2] + back)
                if not learned[k]:
                    learned[k] = True
                    for i in range(3): lvl[k][i] -= rate[i] * lag
            else:
                return
    last = 0
    for inp, mt in tasks:
        need = [1, inp, mt]
        while True:
            if len(ends) >= C: adv(ends[0][0]); continue
            cold = [k for k in range(K) if not probed[k]]
            if cold: k = cold[0]; probed[k] = True; break
            known = [k for k in range(K) if learned[k]]
            if not known: adv(ends[0][0]); continue
            ws = {k: max(max(0, (need[i] - lvl[k][i]) / rate[i]) for i in range(3)) for k in known}
            k = min(ws, key=ws.get); w = ws[k]
            if w <= 1e-9: break
            nxt = t + w
            if ends and ends[0][0] < nxt: adv(ends[0][0])
            else: adv(nxt)
        for i in range(3): lvl[k][i] -= need[i]
        if adm is not None: adm[k].append(t)
        heapq.heappush(ends, (t + lat, k, mt - out)); last = t + lat
    return last
if "--lag" in sys.argv[1:]:
    # Issue 12, eighth pass: the floor of a board that learns from the answers. The same
    # tasks as `--harness` (and `scale_sim`'s SEED=s: fleet f draws with seed s + f - 1), 500 ms
    # answers: the exact client; with each key's probe answered before the rest go; and with
    # the refill of one answer time (0.5 s) lost per key at the probe's answer, which no
    # answer's count proves (docs/multi-node.md 3f').
    def tasks_seeded(K, s, per_fleet=200):
        out = []
        for i in range(per_fleet):
            for f in range(1, K + 1):
                rng = WyRand((((s + f - 1) * 1_000_003) & M64) ^ i)
                inp = rng.u64(100, 500)
                out.append((inp, rng.u64(300, 1500)))
        return out
    for s in range(1, 6):
        for K in (1, 2, 4):
            T = tasks_seeded(K, s)
            exact = run(K=K, C=16 * K, tasks=T)
            probed = run(K=K, C=16 * K, tasks=T, probe=True)
            lagged = run(K=K, C=16 * K, tasks=T, probe=True, lag=0.5)
            print(f"seed {s}, {K} keys: exact {exact:.2f} s, probe first {probed:.2f} s, "
                  f"probe + one answer time of refill lost per key {lagged:.2f} s")
    sys.exit(0)
if "--slow" in sys.argv[1:]:
    # Issue 12, seventh pass: answers slower than the probe grace (scale_sim's LATENCY_MS),
    # and the raise of 60 -> 240 RPM (4x every limit) 10 s in, with 300 tasks on one key.
    for K in (1, 2):
        for lat in (0.5, 1.0, 3.0, 5.0):
            print(f"{K} keys, {200 * K} tasks (the harness's), latency {lat}: "
                  f"{run(K=K, C=16 * K, lat=lat, tasks=harness_tasks(K)):.2f} s")
    for lat in (0.5, 3.0):
        last = run(K=1, rpm=60, C=16, lat=lat, tasks=harness_tasks(1, 300), raise_at=10.0)
        print(f"1 key, 300 tasks, 60 -> 240 RPM at 10 s, latency {lat}: {last:.2f} s")
    sys.exit(0)
if "--harness" in sys.argv[1:]:
    for K in (1, 2, 4):
        for lat in (0.0, 0.5):
            adm = [[] for _ in range(K)]
            last = run(K=K, C=16 * K, lat=lat, tasks=harness_tasks(K), adm=adm)
            print(f"{K} keys, {200 * K} tasks (the harness's), latency {lat}: {last:.2f} s")
            if lat:
                for k, a in enumerate(adm):
                    marks = " ".join(f"#{m}@{a[m - 1]:.2f}" for m in (2, 60, 100, 120, 150, 195, 200) if m <= len(a))
                    print(f"  key {k}: {len(a)} admitted, {marks}")
    # The fleets are closed loops: which one is ahead varies from run to run. The same
    # tasks, each fleet's in its own order, the fleets interleaved at random.
    for K in (2, 4):
        per_fleet = [harness_tasks(K)[f::K] for f in range(K)]
        r = []
        for s in range(200):
            rnd, idx, order = random.Random(s), [0] * K, []
            while len(order) < 200 * K:
                f = rnd.choice([f for f in range(K) if idx[f] < 200])
                order.append(per_fleet[f][idx[f]]); idx[f] += 1
            r.append(run(K=K, C=16 * K, lat=0.5, tasks=order))
        r.sort()
        print(f"{K} keys, latency 0.5, 200 random interleavings of the fleets: min {r[0]:.2f}, "
              f"median {r[100]:.2f}, max {r[-1]:.2f} s")
    sys.exit(0)
for K, n, C in ((1, 200, 16), (2, 400, 32), (4, 800, 64)):
    for lat in (0.0, 0.5):
        r = [run(K=K, n=n, C=C, lat=lat, seed=s) for s in range(1, 21)]
        print(f"{K} keys, {n} tasks, latency {lat}: mean {sum(r)/len(r):.1f} s, min {min(r):.1f}, max {max(r):.1f}")
