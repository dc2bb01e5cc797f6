#!/usr/bin/env bash
# A/B of two worker builds on the same machine, alternated so that drift cancels:
#   scripts/bench-ab.sh BEFORE_BIN AFTER_BIN [PAIRS] [OUT.jsonl] [-- BENCH ARGS…]
# Each pair runs BEFORE's bench, then AFTER's: each build drives its own
# workers (its `profile-worker-bench` when one sits beside the worker binary,
# else, for builds from before the bench had its own crate, `profile-worker bench`), so each measures against its own schema, seed and queue arguments
# (the load generator itself is the same code on both sides unless the change
# touched it). Default bench arguments:
# --commands 20000 --in-flight 500 --rounds 3 --ceiling. BEFORE_ARGS and
# AFTER_ARGS go to one side only; DATABASE_QUERY (e.g. sslmode=disable) is added
# to the bench's database URL.
set -euo pipefail
cd "$(dirname "$0")/.."
before="$1" after="$2" pairs="${3:-3}" out="${4:-bench/ab.jsonl}"
shift $(( $# < 4 ? $# : 4 ))
[ "${1:-}" = "--" ] && shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--commands 20000 --in-flight 500 --rounds 3 --ceiling)
source scripts/services.sh
bench_env
mkdir -p "$(dirname "$out")"
for ((i = 1; i <= pairs; i++)); do
  for side in before after; do
    bin="$before" extra=(${BEFORE_ARGS:-})
    [ "$side" = after ] && bin="$after" extra=(${AFTER_ARGS:-})
    echo "== pair $i: $side ($bin)" >&2
    driver=("$bin" bench)
    [ -x "$(dirname "$bin")/profile-worker-bench" ] && driver=("$(dirname "$bin")/profile-worker-bench" --worker-bin "$bin")
    "${driver[@]}" "${args[@]}" "${extra[@]}" --json "$out.$side"
  done
done
echo "results: $out.before, $out.after" >&2
