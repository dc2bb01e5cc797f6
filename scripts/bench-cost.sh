#!/usr/bin/env bash
# Cost per command, measured honestly (BENCHMARKS.md, "Cost at fixed rates"): the realistic
# topology (the dispatcher's quorum queue and an audit queue, drained by
# consumers that ack), the worker, the plain echo and the events echo
# alternated, closed loop and then at fixed rates, every party's CPU and
# run-queue delay per 1,000 commands, the knee; then serial (W = 1) for the
# p50 excess over the events echo.
#   scripts/bench-cost.sh [OUT]     (default bench/cost.jsonl; serial rounds in OUT's .serial)
#   RATES=1000,2000,4000 RATE_SECS=20 scripts/bench-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/cost.jsonl}"
source scripts/services.sh
bench_env
mkdir -p "$(dirname "$out")"
cargo build --release --locked --quiet --workspace
target/release/profile-worker-bench --commands 20000 --in-flight 500 --rounds 3 --ceiling-events \
  --rates "${RATES:-1000,2000,4000}" --rate-secs "${RATE_SECS:-20}" --json "$out"
target/release/profile-worker-bench --commands 2000 --in-flight 1 --rounds 3 --ceiling-events \
  --json "$out.serial"
