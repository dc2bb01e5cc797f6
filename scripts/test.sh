#!/usr/bin/env bash
# The whole test suite: installs/starts RabbitMQ and PostgreSQL if needed (with
# an amqps listener for the TLS tests), then `cargo test` (unit tests, and
# integration tests against the real servers; each integration test makes its
# own database and prefixed broker names).
#
# `--fast`: the gates, the unit tests and the integration tests (those that
# leave the servers running), in a few minutes; no fault or cluster tests, no
# standby, no cluster. Before a commit; CI runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=false
if [[ "${1:-}" == "--fast" ]]; then
  fast=true
  shift
fi
export PW_AMQPS_PORT="${PW_AMQPS_PORT:-5671}"
source scripts/services.sh
ensure_rust
# The gates every commit passes: formatting and lints, before anything runs.
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The vendored, patched amq-protocol-types (vendor/README.md) with its own tests.
CARGO_TARGET_DIR=target/vendor cargo test --locked -q --manifest-path vendor/amq-protocol-types/Cargo.toml
ensure_services
ensure_prometheus
ensure_examples
# The tests' worker, dispatcher and events reader are broker users limited to
# the tests' names (t<12 hex>.commands…) as the real ones are to profile.…
# (scripts/services.sh, rabbit_users); the tests' own publishers and checks
# use the admin user.
test_users=(profile-worker-test profile-worker-test profile-dispatcher-test profile-dispatcher-test
  profile-reader-test profile-reader-test 't[0-9a-f]{12}' profile-bulk-publisher-test profile-bulk-publisher-test)
rabbit_users "${test_users[@]}"
rabbit_monitor_user profile-keda-test profile-keda-test
export AMQP_URL="$ADMIN_AMQP_URL"
export TEST_WORKER_AMQP_URL="amqp://profile-worker-test:profile-worker-test@127.0.0.1:$PW_AMQP_PORT/%2f"
export TEST_DISPATCHER_AMQP_URL="amqp://profile-dispatcher-test:profile-dispatcher-test@127.0.0.1:$PW_AMQP_PORT/%2f"
export TEST_READER_AMQP_URL="amqp://profile-reader-test:profile-reader-test@127.0.0.1:$PW_AMQP_PORT/%2f"
export TEST_BULK_PUBLISHER_AMQP_URL="amqp://profile-bulk-publisher-test:profile-bulk-publisher-test@127.0.0.1:$PW_AMQP_PORT/%2f"
export TEST_KEDA_AMQP_URL="amqp://profile-keda-test:profile-keda-test@127.0.0.1:$PW_AMQP_PORT/%2f"
export TEST_AMQPS_URL="amqps://profile-worker-test:profile-worker-test@localhost:$PW_AMQPS_PORT/%2f"
export TEST_AMQPS_CA="$PW_TLS_DIR/ca.pem"
# Test databases are made by the owner role; the worker runs as the runtime role.
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://$PW_DB_OWNER:$PW_DB_OWNER_PASSWORD@127.0.0.1:$PW_PG_PORT/postgres}"
export TEST_RUNTIME_DB_USER="$PW_DB_USER" TEST_RUNTIME_DB_PASSWORD="$PW_DB_PASSWORD"
# Where the set-up would reach PostgreSQL over its Unix socket, that host, for
# the test that the worker runs with such a URL.
pg="$(pg_host)"
[ "$pg" = 127.0.0.1 ] || export TEST_PG_SOCKET_HOST="$pg"
# The email dispatcher's own tests (pytest, against the broker and its SMTP
# sink; the worker's tests drive it end to end as well).
"$EXAMPLES_PYTHON" -m pytest -q -p no:cacheprovider examples/dispatcher/tests
if $fast; then
  # Every unit test, the integration binary, the simulation (tests/simulation,
  # no server at all) and the bench's smoke test: none of them stops a server.
  exec cargo test --locked --workspace --lib --bins --test integration --test io_thread --test lanes --test simulation --test smoke "$@"
fi
# Beyond one box (tests/cluster.rs): a three-node RabbitMQ cluster and a
# PostgreSQL primary with a synchronous standby, beside the servers above.
# What this run starts it stops at the end, so they do not hold the machine.
started_here=()
port_open "$((${PW_CLUSTER_PORT:-5680} + 1))" || started_here+=(cluster)
port_open "${PW_PG_PRIMARY_PORT:-5441}" || started_here+=(pg-standby)
bash scripts/cluster.sh start
bash scripts/pg-standby.sh start
PW_RABBIT_NODE=pw1@localhost rabbit_users "${test_users[@]}"
export TEST_PG_PAIR_URL="postgres://$PW_DB_OWNER:$PW_DB_OWNER_PASSWORD@127.0.0.1:${PW_PG_PRIMARY_PORT:-5441},127.0.0.1:${PW_PG_STANDBY_PORT:-5442}/postgres?target_session_attrs=read-write"
stop_started() {
  for s in "${started_here[@]}"; do bash "scripts/$s.sh" stop || true; done
}
# The whole workspace's tests; the last line totals every binary's result.
log="$(mktemp)"
trap 'rm -f "$log"; stop_started' EXIT
set +e
cargo test --locked --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
