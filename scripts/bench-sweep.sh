#!/usr/bin/env bash
# The benchmark behind BENCHMARKS.md: worker and echo ceiling, rounds alternated,
# at W = 1, 10, 100, 500, 2000 commands in flight; then the plot.
#   scripts/bench-sweep.sh [OUT.jsonl]      (default bench/sweep.jsonl)
# Starts RabbitMQ and PostgreSQL like the test command does; each bench run makes
# and removes its own database and vhost.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
bench_env
# The bench creates its own database and vhost: the owner role and the admin user.
out="${1:-bench/sweep.jsonl}"
mkdir -p "$(dirname "$out")"
: > "$out"
cargo build --release --locked --quiet --workspace
bin=target/release/profile-worker-bench
for w in 1 10 100 500 2000; do
  case $w in
    1) n=2000 ;;
    10) n=5000 ;;
    *) n=20000 ;;
  esac
  echo "== W=$w, $n commands per round" >&2
  "$bin" --commands "$n" --in-flight "$w" --rounds 3 --ceiling --json "$out"
done
python3 scripts/bench-plot.py "$out" bench/sweep.svg
