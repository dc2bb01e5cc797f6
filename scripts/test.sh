#!/usr/bin/env bash
# The whole test suite: installs/starts RabbitMQ and PostgreSQL if needed, then
# `cargo test` (unit tests, and integration tests against the real servers; each
# integration test makes its own database and prefixed broker names).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_rust
ensure_services
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://$PW_DB_USER:$PW_DB_PASSWORD@127.0.0.1:$PW_PG_PORT/postgres}"
cargo test --locked --no-fail-fast "$@"
