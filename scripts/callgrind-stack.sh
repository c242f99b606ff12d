#!/usr/bin/env bash
# Instructions per request of the whole `ClaudeStack` as the proxy builds it (all features, no
# cache): the `ClaudeStack_without_cache` bench of benches/rate_limit.rs, counted by callgrind.
# The measure of docs/benchmarks.md, "The stack per request" (fifth pass onwards); instruction
# counts do not depend on the machine's load, unlike the bench's wall time.
#
#   scripts/callgrind-stack.sh                          # build the bench, count it
#   scripts/callgrind-stack.sh /tmp/old/rate_limit-abc  # count bench binaries already built
#   scripts/callgrind-stack.sh before@/tmp/b after@/tmp/a   # NAME@BINARY: a row's name
#   RUNS=2 scripts/callgrind-stack.sh A B               # each binary twice, alternating
#   TOP=40 KEEP_WORK=1 scripts/callgrind-stack.sh       # the profile of each row, kept
#   BENCH=rate_limit_layer_on/ClaudeStack_without_cache PROFILE_TIME=10 scripts/callgrind-stack.sh
#   SIM=1 scripts/callgrind-stack.sh A B                # also each row's footprint (below)
#
# SIM=1 runs each binary a second time under callgrind's cache and branch simulation (the
# machine's L1 and last-level caches as valgrind detects them) and prints, per request (the
# same `Bencher::iter` quotient): I1 misses (code that did not fit the instruction cache), D1
# read and write misses (data: large futures moved to cold memory, fresh allocations),
# mispredicted conditional and indirect branches, and the locked read-modify-write
# instructions executed (`lock`-prefixed or `xchg` with memory, found in `objdump -d` of the
# binary: `Arc` clones and drops, mutexes, atomic counters). That run collects inside
# criterion's `Bencher::iter` only (`--toggle-collect`), so the bench's set-up is not counted
# (it added 20-170 locked instructions per request on a loaded host, whose short profiles
# hold few requests). Found on 2026-12-07: at 24.5k
# instructions against plain Tower's 22.3k, the stack took 1.30x its time; the simulation
# showed 1.7k I1 misses per request against 0.45k, 330 D1 misses against 18 and 147 locked
# instructions against 61 (each ~2.3 ns on this host's AMD EPYC, against 0.6 ns unlocked):
# instruction counts alone do not predict the wall time any more. A model, not the machine
# (no prefetchers): compare rows, not absolute cycles. With TOP, the functions with the most
# I1 and D1 misses and locked instructions per request follow.
# Then ("lines:", scripts/callgrind-footprint.py) the bytes of the code run every request, the
# 64-byte lines they touch and the fewest lines they could fill: hot code beyond the 32 KiB L1i
# misses once a line a request, so lines touched ~ I1 misses. Count enough requests (printed):
# on a loaded host a profile may hold a few dozen, and one-off costs then weigh per request.
#
# Keep a "before" binary for a comparison: `cargo bench --all-features --bench rate_limit
# --no-run` prints the executable's path; copy it out of target/ before changing the code.
#
# For each binary: `valgrind --tool=callgrind BINARY --bench BENCH --profile-time PROFILE_TIME`
# (criterion's profile mode: the bench's closure runs for that long, no analysis), then the
# inclusive instructions of `criterion::bencher::Bencher::iter` (from `callgrind_annotate
# --inclusive=yes`) divided by the calls of the bench's `request()` (read from the callgrind
# output's `calls=` lines): one `request()` per iteration, warm-up included, so the quotient is
# the cost of one request through the stack plus the bench's own work (building the request,
# polling, collecting the answer; ~6k, the `inner_only` bench). Printed: instructions per
# request and the ratio to the first row; with TOP, the functions with the most inclusive
# instructions per request. The same binary counted twice differs by up to ~0.15 %.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH="${BENCH:-ClaudeStack_without_cache}"
PROFILE_TIME="${PROFILE_TIME:-5}"
RUNS="${RUNS:-1}"
TOP="${TOP:-0}"

for tool in valgrind callgrind_annotate python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "needs $tool" >&2; exit 1; }
done

bins=("$@")
if [ "${#bins[@]}" = 0 ]; then
  # The bench executable cargo just built (its path is on the "Executable" line).
  bin=$(cargo bench --all-features --bench rate_limit --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
  [ -n "$bin" ] || { echo "no bench executable found" >&2; exit 1; }
  bins=("current@$bin")
fi

work="$(mktemp -d)"
trap 'if [ -n "${KEEP_WORK:-}" ]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi' EXIT

# calls FILE FUNCTION: the calls to FUNCTION recorded in the callgrind output FILE (names are
# compressed: `cfn=(id) name` once, then `cfn=(id)`; the `calls=N ...` line follows a `cfn=`).
calls() {
  python3 - "$1" "$2" <<'PY'
import re, sys
path, target = sys.argv[1], sys.argv[2]
names, want, total, pending = {}, set(), 0, False
with open(path, errors="replace") as f:
    for line in f:
        m = re.match(r"c?fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            if m.group(2) is not None:
                names[m.group(1)] = m.group(2)
                if m.group(2) == target:
                    want.add(m.group(1))
            pending = line.startswith("cfn=") and m.group(1) in want
            continue
        if pending and line.startswith("calls="):
            total += int(line[6:].split()[0])
            pending = False
print(total)
PY
}

if [ -n "${SIM:-}" ]; then
  command -v objdump >/dev/null 2>&1 || { echo "SIM=1 needs objdump (binutils)" >&2; exit 1; }
fi

# footprint OUT BINARY N TOP: the SIM=1 row of a cache-and-branch-simulated callgrind output.
footprint() {
  python3 scripts/callgrind-footprint.py "$@"
}

printf '%-24s %14s %10s\n' binary instr/request x_first
first=""
for round in $(seq 1 "$RUNS"); do
  i=0
  for entry in "${bins[@]}"; do
    i=$((i + 1))
    name="$entry"
    bin="$entry"
    if [[ "$entry" == *@* ]]; then name="${entry%%@*}"; bin="${entry#*@}"; fi
    [ "$name" = "$bin" ] && name="$i:$(basename "$bin")"
    out="$work/callgrind.$i.$round"
    valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$bin" --bench "$BENCH" --profile-time "$PROFILE_TIME" >"$out.log" 2>&1 ||
      { cat "$out.log" >&2; exit 1; }
    annotated="$out.inclusive"
    callgrind_annotate --inclusive=yes --threshold=100 "$out" >"$annotated" 2>/dev/null
    iter=$(awk '/criterion::bencher::Bencher<M>::iter/ {gsub(",", "", $1); print $1; exit}' "$annotated")
    n=$(calls "$out" "rate_limit::request")
    if [ -z "$iter" ] || [ "${n:-0}" = 0 ]; then
      echo "$name: no Bencher::iter or no request() calls in the profile" >&2
      exit 1
    fi
    per=$((iter / n))
    [ -z "$first" ] && first=$per
    printf '%-24s %14d %10s\n' "$name" "$per" \
      "$(awk -v a="$per" -v b="$first" 'BEGIN{printf "%.4f", a/b}')"
    if [ "$TOP" -gt 0 ]; then
      awk -v n="$n" -v top="$TOP" '
        /^-+$/ { sep++; next }
        sep >= 4 && $1 ~ /^[0-9,]+$/ && shown < top {
          ir = $1; gsub(",", "", ir); $1 = ""; sub(/^ +\([^)]*\) +/, ""); sub(/^ +/, "")
          printf "%10.0f  %s\n", ir / n, substr($0, 1, 150); shown++
        }' "$annotated"
    fi
    if [ -n "${SIM:-}" ]; then
      sim="$work/sim.$i.$round"
      # Collected inside criterion's measured loop only (--toggle-collect): the bench's
      # set-up and its locked instructions are left out, whatever the host's load.
      valgrind --tool=callgrind --cache-sim=yes --branch-sim=yes --dump-instr=yes \
        --compress-pos=no --toggle-collect='criterion::bencher::Bencher*::iter*' \
        --callgrind-out-file="$sim" \
        "$bin" --bench "$BENCH" --profile-time "$PROFILE_TIME" >"$sim.log" 2>&1 ||
        { cat "$sim.log" >&2; exit 1; }
      footprint "$sim" "$bin" "$(calls "$sim" "rate_limit::request")" "$TOP"
      if [ "$TOP" -gt 0 ]; then
        for ev in I1mr D1mw D1mr; do
          echo "    by $ev, per request (exclusive):"
          callgrind_annotate --show="$ev" --sort="$ev" "$sim" 2>/dev/null |
            awk -v n="$(calls "$sim" "rate_limit::request")" -v top="$TOP" '
              /^-+$/ { sep++; next }
              sep >= 4 && $1 ~ /^[0-9,]+$/ && shown < top {
                v = $1; gsub(",", "", v); $1 = ""; sub(/^ +\([^)]*\) +/, ""); sub(/^ +/, "")
                printf "    %8.1f  %s\n", v / n, substr($0, 1, 140); shown++
              }'
        done
      fi
    fi
  done
done
