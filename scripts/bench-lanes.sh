#!/usr/bin/env bash
# The lanes benchmark (BENCHMARKS.md, "A login during a bulk import"; issue 32): an interactive caller
# (create-ticket, one at a time) alone, then during an import of IMPORT
# fire-and-forget create-tickets published as fast as the broker takes them,
# into the command queue (one lane for everything, as before the bulk lane)
# and into the bulk lane, alternated, ROUNDS times; then the same with a
# steady interactive load of STEADY commands per second through each import.
# Every party's CPU and run-queue delay per 1,000 imported commands.
#   scripts/bench-lanes.sh [OUT]      (default bench/lanes.jsonl; the steady runs in OUT's .steady)
#   IMPORT=300000 ROUNDS=2 STEADY=4000 STEADY_IMPORT=100000 scripts/bench-lanes.sh
#   Extra flags go to the bench: scripts/bench-lanes.sh bench/x.jsonl --bulk-prefetch 100
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/lanes.jsonl}"
shift || true
source scripts/services.sh
bench_env
mkdir -p "$(dirname "$out")"
cargo build --release --locked --quiet --workspace
bench=target/release/profile-worker-bench
"$bench" --import "${IMPORT:-300000}" --rounds "${ROUNDS:-2}" --import-lanes interactive,bulk \
  --idle-secs "${IDLE_SECS:-10}" --json "$out" "$@"
if [ "${STEADY:-0}" != 0 ]; then
  "$bench" --import "${STEADY_IMPORT:-100000}" --rounds "${ROUNDS:-2}" --import-lanes bulk \
    --idle-secs "${IDLE_SECS:-10}" --steady-rate "$STEADY" --json "$out.steady" "$@"
fi
