#!/usr/bin/env bash
# Latency against offered load: the worker's closed-loop rate first, then open-loop
# rounds at 10, 25, 50, 75 and 90 % of it, the worker, the echo ceiling and the
# events ceiling alternated at each load; then the plot.
#   scripts/bench-latency.sh [RUNS] [OUT.jsonl]      (default 3 runs, bench/latency.jsonl)
# Starts RabbitMQ and PostgreSQL like the test command does; each run makes and
# removes its own database and vhost.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}" out="${2:-bench/latency.jsonl}"
source scripts/services.sh
bench_env
mkdir -p "$(dirname "$out")"
: > "$out"
cargo build --release --locked --quiet --workspace
for ((i = 1; i <= runs; i++)); do
  echo "== run $i of $runs" >&2
  target/release/profile-worker-bench --commands 20000 --in-flight 500 --rounds 3 \
    --ceiling-events --load-percent 10,25,50,75,90 --open-loop-secs 4 --json "$out"
done
python3 scripts/bench-latency-plot.py "$out" "${out%.jsonl}.svg"
