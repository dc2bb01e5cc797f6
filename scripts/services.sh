#!/usr/bin/env bash
# Makes RabbitMQ and PostgreSQL available on loopback for the worker and its tests.
#
# Sourced by run.sh and test.sh. Order of preference:
#   1. servers already answering on the configured ports are used as they are;
#   2. a working Docker engine -> `docker compose up -d rabbitmq postgres`;
#   3. otherwise Debian's packages are installed (if missing) and started by hand
#      (there is no systemd on these machines: `rabbitmq-server -detached`, `pg_ctlcluster`).
# Afterwards the role and database named below exist (role may create databases,
# which the test suite needs for its one-database-per-test isolation).
set -euo pipefail

PW_DB_USER="${PW_DB_USER:-profile_worker}"
PW_DB_PASSWORD="${PW_DB_PASSWORD:-profile_worker}"
PW_DB_NAME="${PW_DB_NAME:-profile_worker}"
PW_PG_PORT="${PW_PG_PORT:-5432}"
PW_AMQP_PORT="${PW_AMQP_PORT:-5672}"

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 4; i++)); do
    port_open "$1" && return 0
    sleep 0.25
  done
  log "$3 did not open port $1 within $2 s"
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    as_root apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

docker_usable() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }

start_with_docker() {
  log "Docker engine found: docker compose up -d rabbitmq postgres"
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && docker compose up -d --wait rabbitmq postgres)
}

start_rabbitmq() {
  if port_open "$PW_AMQP_PORT"; then log "RabbitMQ already listening on $PW_AMQP_PORT"; return; fi
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  log "starting rabbitmq-server -detached"
  # A node left half-dead by an earlier session would make -detached exit at once.
  as_root rabbitmqctl -q stop >/dev/null 2>&1 || true
  as_root rabbitmq-server -detached
  # -detached returns before the node is registered, so wait for the port first.
  wait_port "$PW_AMQP_PORT" 120 RabbitMQ
  as_root timeout 60 rabbitmqctl -q await_startup
}

pg_version() { ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1; }

start_postgres() {
  if ! port_open "$PW_PG_PORT"; then
    [ -n "$(pg_version)" ] || apt_install postgresql
    local ver; ver="$(pg_version)"
    if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$ver main"; then
      log "creating cluster $ver/main"
      as_root pg_createcluster "$ver" main >/dev/null
    fi
    log "starting PostgreSQL $ver/main"
    as_root pg_ctlcluster "$ver" main start || true
    wait_port "$PW_PG_PORT" 60 PostgreSQL
  else
    log "PostgreSQL already listening on $PW_PG_PORT"
  fi
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  # Create the role and database when we can reach the server as its superuser
  # (local peer auth); with Docker the image already created them from the env.
  if id postgres >/dev/null 2>&1; then
    as_root su postgres -c "psql -q -v ON_ERROR_STOP=1 -p $PW_PG_PORT" <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PW_DB_USER') THEN
    CREATE ROLE "$PW_DB_USER" LOGIN CREATEDB PASSWORD '$PW_DB_PASSWORD';
  ELSE
    ALTER ROLE "$PW_DB_USER" LOGIN CREATEDB PASSWORD '$PW_DB_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE "$PW_DB_NAME" OWNER "$PW_DB_USER"'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PW_DB_NAME')\gexec
SQL
  fi
}

ensure_services() {
  if ! port_open "$PW_AMQP_PORT" || ! port_open "$PW_PG_PORT"; then
    if docker_usable; then start_with_docker; fi
  fi
  start_rabbitmq
  start_postgres
  export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:$PW_AMQP_PORT/%2f}"
  export DATABASE_URL="${DATABASE_URL:-postgres://$PW_DB_USER:$PW_DB_PASSWORD@127.0.0.1:$PW_PG_PORT/$PW_DB_NAME}"
  log "ready: AMQP_URL=${AMQP_URL%%//*}//…@127.0.0.1:$PW_AMQP_PORT, DATABASE_URL=postgres://…@127.0.0.1:$PW_PG_PORT/$PW_DB_NAME"
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 || { log "cargo not found: install a Rust toolchain (rustup) first"; exit 1; }
  # Crates with C parts (ring) need a C compiler.
  command -v cc >/dev/null 2>&1 || apt_install build-essential
}

# Run directly (`bash scripts/services.sh`) it just starts the servers.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then ensure_services; fi
