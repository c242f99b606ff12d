#!/usr/bin/env bash
# A profile-guided (PGO) release build of claude-proxy: the fastest binary this repository makes.
#
#   scripts/pgo-build.sh            # writes target/pgo/claude-proxy (~10 min on 2 cores from a fresh clone)
#
# Three steps, all from this repository, nothing to start by hand:
#   1. `claude-proxy` built with instrumentation (`-Cprofile-generate`);
#   2. a training run (scripts/pgo-train.sh): the instrumented proxy in front of the built-in
#      simulator served over HTTP (`loadgen mock`, zero latency), driven by `loadgen run` in
#      each cache mode, with JSON and streaming answers, one and many connections, misses and
#      hits, two keys; then two teams of a tenants file at once, and the quota and cache in
#      Redis when redis-server is installed;
#   3. the profiles merged (`llvm-profdata`) and the proxy built again with `-Cprofile-use`.
#
# Why: the proxy's profile is flat (hundreds of functions, none above a few per cent) and its
# instructions are slow ones (instruction-cache and branch misses: docs/benchmarks.md, "A
# wake-up per request"). Profile-guided layout and inlining is the compiler's answer to that
# shape; the training load is not the benchmark's (nginx and wrk in scripts/bench-proxy.sh),
# so the gain measured there is not one learned from its own requests.
#
# Needs `llvm-profdata` of the compiler's LLVM: the `llvm-tools` component
# (`rustup component add llvm-tools`, done here when rustup is present), or LLVM_PROFDATA.
# Environment: PGO_DIR (default target/pgo), TRAIN_SECONDS (per load, default 2), KEEP_RAW=1
# keeps the raw profiles, PGO_LAYOUT=0 leaves out the block layout options (below). The build
# uses its own target directory (PGO_DIR/build, ~1 GB): the flags differ from a normal build's,
# so sharing target/ would rebuild both every time.
set -euo pipefail
cd "$(dirname "$0")/.."

PGO_DIR=${PGO_DIR:-target/pgo}
TRAIN_SECONDS=${TRAIN_SECONDS:-2}
mkdir -p "$PGO_DIR"
PGO_DIR=$(realpath "$PGO_DIR")
host=$(rustc -vV | sed -n 's/^host: //p')
build_dir="$PGO_DIR/build"
raw="$PGO_DIR/raw"

profdata=${LLVM_PROFDATA:-"$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"}
if [ ! -x "$profdata" ]; then
  if [ -z "${LLVM_PROFDATA:-}" ] && command -v rustup > /dev/null; then
    rustup component add llvm-tools || true
  fi
  if [ ! -x "$profdata" ]; then
    echo "pgo-build: no llvm-profdata at $profdata: run 'rustup component add llvm-tools'," >&2
    echo "or set LLVM_PROFDATA to the llvm-profdata of rustc's LLVM ($(rustc -vV | sed -n 's/^LLVM version: //p'))" >&2
    exit 1
  fi
fi

# `--target` makes RUSTFLAGS apply to the crates of the binary only, not to build scripts and
# procedural macros (which would write profiles of their own while compiling).
build() {
  RUSTFLAGS="${RUSTFLAGS:-} $1" CARGO_TARGET_DIR="$build_dir" \
    cargo build --release --features proxy --bin claude-proxy --target "$host"
}

echo "pgo-build: 1/3 instrumented build" >&2
rm -rf "$raw"
mkdir -p "$raw"
build "-Cprofile-generate=$raw"
instrumented="$PGO_DIR/claude-proxy-instrumented"
cp "$build_dir/$host/release/claude-proxy" "$instrumented"
# The load tool and the simulator, built as usual (they are not what is measured).
cargo build --release --features proxy --example loadgen
loadgen="${CARGO_TARGET_DIR:-target}/release/examples/loadgen"

echo "pgo-build: 2/3 training run" >&2
LLVM_PROFILE_FILE="$raw/proxy-%p-%m.profraw" TRAIN_SECONDS="$TRAIN_SECONDS" \
  scripts/pgo-train.sh "$instrumented" "$loadgen"

echo "pgo-build: 3/3 optimised build" >&2
"$profdata" merge -o "$PGO_DIR/claude-proxy.profdata" "$raw"
# With the profile, LLVM can also lay out each function's blocks for the paths taken (ext-TSP)
# and move the cold blocks of hot functions out of line (machine function splitting): the hot
# code packed closer. Measured beside the profile alone (docs/benchmarks.md, "A profile-guided
# build"): ~1.06x the throughput. They are LLVM options, not rustc's: a compiler whose LLVM
# no longer knows them gets the profile alone (PGO_LAYOUT=0 asks for that too).
use="-Cprofile-use=$PGO_DIR/claude-proxy.profdata"
layout="-Cllvm-args=-enable-ext-tsp-block-placement -Cllvm-args=-enable-split-machine-functions"
# shellcheck disable=SC2086 # the flags are words
if [ "${PGO_LAYOUT:-1}" = 1 ] && rustc $layout --print cfg > /dev/null 2>&1; then
  build "$use $layout"
else
  echo "pgo-build: the profile alone (no block layout options)" >&2
  build "$use"
fi
cp "$build_dir/$host/release/claude-proxy" "$PGO_DIR/claude-proxy"
rm -f "$instrumented"
[ -n "${KEEP_RAW:-}" ] || rm -rf "$raw"
echo "$PGO_DIR/claude-proxy"
