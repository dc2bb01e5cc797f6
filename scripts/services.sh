#!/usr/bin/env bash
# Makes RabbitMQ and PostgreSQL available on loopback for the worker and its tests.
#
# Sourced by run.sh and test.sh. Order of preference:
#   1. servers already answering on the configured ports are used as they are;
#   2. a working Docker engine -> `docker compose up -d rabbitmq postgres`;
#   3. otherwise Debian's packages are installed (if missing) and started by hand
#      (there is no systemd on these machines: `rabbitmq-server -detached`, `pg_ctlcluster`).
# Least privilege (CONTRACT §9), set up here:
#   PostgreSQL: an owner role that runs migrations and seeds (and may create
#     databases, which the test suite needs for its one-database-per-test
#     isolation), and a runtime role with only row rights (granted by
#     `profile-worker migrate` with DATABASE_RUNTIME_ROLE), which `run` uses;
#   RabbitMQ (who may read what, CONTRACT §1; docs/OPERATIONS.md has the table):
#     the worker's user, limited to its own exchanges and queues and the default
#     exchange for replies; the email dispatcher's, which may only consume the
#     dispatch queue; an events reader's, which may bind its own queues to
#     profile.events and nothing to profile.email. Publishers and the
#     operator's tools use their own users (here: guest, loopback only).
# Nothing listens on a non-loopback address: RabbitMQ's listeners, epmd and
# Erlang distribution are bound to 127.0.0.1 (Debian's PostgreSQL already is).
set -euo pipefail

PW_DB_OWNER="${PW_DB_OWNER:-profile_worker_owner}"
PW_DB_OWNER_PASSWORD="${PW_DB_OWNER_PASSWORD:-profile_worker_owner}"
PW_DB_USER="${PW_DB_USER:-profile_worker}"
PW_DB_PASSWORD="${PW_DB_PASSWORD:-profile_worker}"
PW_DB_NAME="${PW_DB_NAME:-profile_worker}"
PW_PG_PORT="${PW_PG_PORT:-5432}"
PW_AMQP_PORT="${PW_AMQP_PORT:-5672}"
PW_RABBIT_USER="${PW_RABBIT_USER:-profile-worker}"
PW_RABBIT_PASSWORD="${PW_RABBIT_PASSWORD:-profile-worker}"
# The vhost the worker's URLs point at (made when it is not "/").
PW_RABBIT_VHOST="${PW_RABBIT_VHOST:-/}"
# When set (the test command sets 5671), RabbitMQ also gets an amqps listener
# with certificates made here by openssl, in PW_TLS_DIR.
PW_AMQPS_PORT="${PW_AMQPS_PORT:-}"
PW_TLS_DIR="${PW_TLS_DIR:-/etc/rabbitmq/profile-worker-tls}"
RABBIT_CONF=/etc/rabbitmq/rabbitmq.conf
RABBIT_MARK="# written by profile-worker scripts/services.sh"
PW_DISPATCHER_USER="${PW_DISPATCHER_USER:-profile-email-dispatcher}"
PW_DISPATCHER_PASSWORD="${PW_DISPATCHER_PASSWORD:-profile-email-dispatcher}"
PW_EVENTS_READER_USER="${PW_EVENTS_READER_USER:-profile-events-reader}"
PW_EVENTS_READER_PASSWORD="${PW_EVENTS_READER_PASSWORD:-profile-events-reader}"
# A caller's user: publishes commands, gets replies by direct reply-to or a
# server-named queue (what `send`, the examples and run.sh's lines use).
PW_PUBLISHER_USER="${PW_PUBLISHER_USER:-profile-publisher}"
PW_PUBLISHER_PASSWORD="${PW_PUBLISHER_PASSWORD:-profile-publisher}"
# An importer's user: publishes commands to the bulk lane only (`provision`).
PW_BULK_PUBLISHER_USER="${PW_BULK_PUBLISHER_USER:-profile-bulk-publisher}"
PW_BULK_PUBLISHER_PASSWORD="${PW_BULK_PUBLISHER_PASSWORD:-profile-bulk-publisher}"
# KEDA's user: the management API's queue depths, nothing over AMQP.
PW_KEDA_USER="${PW_KEDA_USER:-profile-keda}"
PW_KEDA_PASSWORD="${PW_KEDA_PASSWORD:-profile-keda}"
# The broker's administrator (tests' checks and clean-up, the bench's vhosts):
# Debian's guest, limited to loopback; compose's admin user, which replaces it.
PW_ADMIN_AMQP_USER="${PW_ADMIN_AMQP_USER:-guest}"
PW_ADMIN_AMQP_PASSWORD="${PW_ADMIN_AMQP_PASSWORD:-guest}"

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

# Never prompts: sudo -n fails at once where it would ask for a password.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif ! sudo -n "$@"; then
    log "needs root for: $* (sudo -n refused or failed; run as root, or allow this user passwordless sudo)"
    return 1
  fi
}

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
  # The compose stack is a development one of its own: its database and vhost
  # (made by its init scripts) are used, not run.sh's names for a shared server.
  PW_DB_NAME=profile_worker
  PW_RABBIT_VHOST=/
  # compose's RabbitMQ has no guest (RABBITMQ_DEFAULT_USER replaces it).
  PW_ADMIN_AMQP_USER=admin PW_ADMIN_AMQP_PASSWORD=admin
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && docker compose up -d --wait rabbitmq postgres &&
    docker compose run --rm rabbitmq-users)
}

# A CA and a server certificate for 127.0.0.1/localhost, made once.
make_tls_certs() {
  [ -s "$PW_TLS_DIR/server.pem" ] && return
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  log "making test certificates in $PW_TLS_DIR"
  as_root mkdir -p "$PW_TLS_DIR"
  local d; d="$(mktemp -d)"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=profile-worker test CA" \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$d/ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/ext" -out "$d/server.pem" 2>/dev/null
  as_root cp "$d/ca.pem" "$d/server.pem" "$d/server.key" "$PW_TLS_DIR/"
  as_root chmod 644 "$PW_TLS_DIR/ca.pem" "$PW_TLS_DIR/server.pem"
  as_root chmod 640 "$PW_TLS_DIR/server.key"
  id rabbitmq >/dev/null 2>&1 && as_root chown rabbitmq "$PW_TLS_DIR/server.key"
  rm -rf "$d"
}

# RabbitMQ's configuration, unless the machine has one of its own.
write_rabbit_conf() {
  if [ -e "$RABBIT_CONF" ] && ! grep -qF "$RABBIT_MARK" "$RABBIT_CONF"; then
    log "$RABBIT_CONF is not ours; leaving it as it is"
    return
  fi
  {
    echo "$RABBIT_MARK"
    echo "listeners.tcp.default = 127.0.0.1:$PW_AMQP_PORT"
    echo "loopback_users.guest = true"
    if [ -n "$PW_AMQPS_PORT" ]; then
      echo "listeners.ssl.default = 127.0.0.1:$PW_AMQPS_PORT"
      echo "ssl_options.cacertfile = $PW_TLS_DIR/ca.pem"
      echo "ssl_options.certfile = $PW_TLS_DIR/server.pem"
      echo "ssl_options.keyfile = $PW_TLS_DIR/server.key"
      echo "ssl_options.verify = verify_none"
      echo "ssl_options.fail_if_no_peer_cert = false"
    fi
  } | as_root tee "$RABBIT_CONF.new" >/dev/null
  as_root mv "$RABBIT_CONF.new" "$RABBIT_CONF"
}

start_rabbitmq() {
  if port_open "$PW_AMQP_PORT"; then
    if [ -z "$PW_AMQPS_PORT" ] || port_open "$PW_AMQPS_PORT"; then
      log "RabbitMQ already listening on $PW_AMQP_PORT"
      return
    fi
    if ! command -v rabbitmqctl >/dev/null 2>&1; then
      log "RabbitMQ on $PW_AMQP_PORT is not ours to restart; amqps tests need a listener on $PW_AMQPS_PORT"
      return
    fi
    log "restarting RabbitMQ to add the amqps listener on $PW_AMQPS_PORT"
    as_root rabbitmqctl -q stop >/dev/null 2>&1 || true
  fi
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  [ -n "$PW_AMQPS_PORT" ] && make_tls_certs
  write_rabbit_conf
  log "starting rabbitmq-server -detached"
  # A node left half-dead by an earlier session would make -detached exit at once.
  as_root rabbitmqctl -q stop >/dev/null 2>&1 || true
  # epmd and Erlang distribution on loopback too (an epmd already started on
  # every interface is replaced).
  as_root epmd -kill >/dev/null 2>&1 || true
  as_root env ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    rabbitmq-server -detached
  # -detached returns before the node is registered, so wait for the port first.
  wait_port "$PW_AMQP_PORT" 120 RabbitMQ
  as_root timeout 60 rabbitmqctl -q await_startup
  [ -z "$PW_AMQPS_PORT" ] || wait_port "$PW_AMQPS_PORT" 30 "RabbitMQ (amqps)"
}

# A broker user with exactly these permissions on the vhost (anchored regexes).
# USER PASSWORD CONFIGURE WRITE READ
# On the node PW_RABBIT_NODE when set (a cluster's), else the default node.
rabbit_user() {
  command -v rabbitmqctl >/dev/null 2>&1 || { log "no rabbitmqctl: create broker user $1 yourself"; return; }
  local n=(); [ -z "${PW_RABBIT_NODE:-}" ] || n=(-n "$PW_RABBIT_NODE")
  as_root rabbitmqctl "${n[@]}" -q add_user "$1" "$2" >/dev/null 2>&1 ||
    as_root rabbitmqctl "${n[@]}" -q change_password "$1" "$2" >/dev/null
  as_root rabbitmqctl "${n[@]}" -q set_permissions -p "$PW_RABBIT_VHOST" "$1" "$3" "$4" "$5" >/dev/null
}

# The three users of CONTRACT §1 for the names starting with PREFIX (a regex:
# 'profile' for the defaults, the tests' 't[0-9a-f]{12}'), with these
# passwords: WORKER_USER WORKER_PASSWORD DISPATCHER_USER DISPATCHER_PASSWORD
# READER_USER READER_PASSWORD PREFIX
#   worker: declares all its objects (configure), publishes to its exchanges
#     and binds its queues (write), consumes the command queue and binds from
#     its exchanges (read; RabbitMQ also wants read on a queue declared with a
#     dead-letter exchange, hence the dispatch queue);
#   dispatcher: consumes the dispatch queue, and nothing else at all;
#   events reader: its own queues (amq.gen-… or <user>.…) bound to the events
#     exchange; binding to the email exchange needs read on it, which it lacks.
rabbit_users() {
  local p="$7" own="$5"
  local names="$p\\.(commands(\\.(dlx|dead|unrouted|bulk(\\.unrouted)?))?|events|email(\\.(dlx|dispatch(\\.dead)?))?)"
  rabbit_user "$1" "$2" "^$names\$" "^(amq\\.default|$names)\$" \
    "^$p\\.(commands(\\.(dlx|unrouted|bulk(\\.unrouted)?))?|email(\\.(dlx|dispatch))?)\$"
  # The dispatcher reads its queue, and may write only to the queue's dead-letter
  # exchange (a request it gives up on goes there with its reason).
  rabbit_user "$3" "$4" '^$' "^$p\\.email\\.dlx\$" "^$p\\.email\\.dispatch\$"
  local mine="(amq\\.gen-.*|$own\\..*)"
  rabbit_user "$5" "$6" "^$mine\$" "^$mine\$" "^($mine|$p\\.events)\$"
  # A bulk publisher (an import, batch provisioning): writes to the bulk
  # exchange only, so it cannot put its load in the interactive lane.
  if [ -n "${8:-}" ]; then
    rabbit_user "$8" "$9" '^amq\.gen-.*$' "^$p\\.commands\\.bulk\$" '^amq\.gen-.*$'
  fi
}

# KEDA's management-API user (deploy/kubernetes, components/keda): the
# management tag, to read queue depths over HTTP, and access to the vhost with
# no right on any object, so over AMQP it can declare, publish and read nothing.
# USER PASSWORD
rabbit_monitor_user() {
  rabbit_user "$1" "$2" '^$' '^$' '^$'
  command -v rabbitmqctl >/dev/null 2>&1 || return 0
  local n=(); [ -z "${PW_RABBIT_NODE:-}" ] || n=(-n "$PW_RABBIT_NODE")
  as_root rabbitmqctl "${n[@]}" -q set_user_tags "$1" management >/dev/null
}

# The vhost's path in an AMQP URL.
vhost_path() { if [ "$PW_RABBIT_VHOST" = / ]; then echo %2f; else echo "$PW_RABBIT_VHOST"; fi; }

# The newest PostgreSQL *server* installed: postgresql-client alone also makes
# /usr/lib/postgresql/N (with psql), so look for the server binary.
pg_version() {
  local d
  for d in $(ls /usr/lib/postgresql 2>/dev/null | sort -n); do
    [ -x "/usr/lib/postgresql/$d/bin/postgres" ] && echo "$d"
  done | tail -1
}

start_postgres() {
  if ! port_open "$PW_PG_PORT"; then
    [ -n "$(pg_version)" ] || apt_install postgresql ssl-cert
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
  pg_roles "$PW_PG_PORT"
  pg_socket_auth
}

# This machine's own cluster's pg_hba.conf; nothing when there is none.
pg_hba_file() {
  local ver; ver="$(pg_version)"
  if [ -n "$ver" ] && [ -f "/etc/postgresql/$ver/main/pg_hba.conf" ]; then
    echo "/etc/postgresql/$ver/main/pg_hba.conf"
  fi
}

# Whether that file lets the worker's two roles in over the Unix socket.
pg_socket_allowed() {
  local hba; hba="$(pg_hba_file)"
  [ -n "$hba" ] && grep -qE "^local[[:space:]]+all[[:space:]]+$PW_DB_OWNER,$PW_DB_USER[[:space:]]" "$hba"
}

# This machine's own cluster lets the worker's roles in over the Unix socket
# with their passwords (Debian's pg_hba.conf lets local connections in only as
# the OS user of the same name): one line before Debian's `local all all`.
pg_socket_auth() {
  local hba roles="$PW_DB_OWNER,$PW_DB_USER"
  hba="$(pg_hba_file)"
  [ -n "$hba" ] || return 0
  pg_socket_allowed && return 0
  log "letting $roles in over the Unix socket (scram-sha-256)"
  as_root sed -i "0,/^local[[:space:]]\+all[[:space:]]\+all[[:space:]]/s//local   all             $roles   scram-sha-256\n&/" "$hba"
  as_root pg_ctlcluster "$(pg_version)" main reload
}

# Where the worker's URLs reach PostgreSQL: this machine's own cluster over its
# Unix socket (no TCP, no TLS handshake; BENCHMARKS.md, "Changes, measured"), a server in
# Docker or elsewhere over TCP. PW_PG_SOCKET=0 forces TCP.
pg_host() {
  if [ "${PW_PG_SOCKET:-1}" = 1 ] && [ -S "/var/run/postgresql/.s.PGSQL.$PW_PG_PORT" ] && pg_socket_allowed; then
    echo "%2Fvar%2Frun%2Fpostgresql"
  else
    echo 127.0.0.1
  fi
}

# The owner and runtime roles and the database, on the server at PORT, when we
# can reach it as its superuser (local peer auth); with Docker the image's init
# script creates them.
pg_roles() {
  local port="$1"
  if id postgres >/dev/null 2>&1; then
    as_root su postgres -c "psql -q -v ON_ERROR_STOP=1 -p $port" <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PW_DB_OWNER') THEN
    CREATE ROLE "$PW_DB_OWNER" LOGIN CREATEDB PASSWORD '$PW_DB_OWNER_PASSWORD';
  ELSE
    ALTER ROLE "$PW_DB_OWNER" LOGIN CREATEDB PASSWORD '$PW_DB_OWNER_PASSWORD';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PW_DB_USER') THEN
    CREATE ROLE "$PW_DB_USER" LOGIN PASSWORD '$PW_DB_PASSWORD';
  END IF;
  -- Only row rights, granted table by table: no DDL, no databases, no roles.
  ALTER ROLE "$PW_DB_USER" LOGIN NOCREATEDB NOCREATEROLE NOSUPERUSER PASSWORD '$PW_DB_PASSWORD';
END \$\$;
-- The owner may end the runtime role's sessions, so that dropping a database
-- (the tests' clean-up, DROP DATABASE … WITH (FORCE)) is not held up by them.
GRANT pg_signal_backend TO "$PW_DB_OWNER";
SELECT 'CREATE DATABASE "$PW_DB_NAME" OWNER "$PW_DB_OWNER"'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PW_DB_NAME')\gexec
ALTER DATABASE "$PW_DB_NAME" OWNER TO "$PW_DB_OWNER";
\c "$PW_DB_NAME"
-- Tables an older set-up made as the runtime role move to the owner.
REASSIGN OWNED BY "$PW_DB_USER" TO "$PW_DB_OWNER";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
  fi
}

ensure_services() {
  if ! port_open "$PW_AMQP_PORT" || ! port_open "$PW_PG_PORT"; then
    if docker_usable; then start_with_docker; fi
  fi
  start_rabbitmq
  start_postgres
  if [ "$PW_RABBIT_VHOST" != / ] && command -v rabbitmqctl >/dev/null 2>&1; then
    as_root rabbitmqctl -q add_vhost "$PW_RABBIT_VHOST" >/dev/null 2>&1 || true
    as_root rabbitmqctl -q set_permissions -p "$PW_RABBIT_VHOST" guest '.*' '.*' '.*' >/dev/null
  fi
  rabbit_users "$PW_RABBIT_USER" "$PW_RABBIT_PASSWORD" "$PW_DISPATCHER_USER" "$PW_DISPATCHER_PASSWORD" \
    "$PW_EVENTS_READER_USER" "$PW_EVENTS_READER_PASSWORD" profile \
    "$PW_BULK_PUBLISHER_USER" "$PW_BULK_PUBLISHER_PASSWORD"
  rabbit_monitor_user "$PW_KEDA_USER" "$PW_KEDA_PASSWORD"
  # As compose's rabbitmq-users makes it (deploy/compose/rabbitmq-users.sh).
  rabbit_user "$PW_PUBLISHER_USER" "$PW_PUBLISHER_PASSWORD" '^amq\.gen-.*$' '^profile\.commands$' '^amq\.gen-.*$'
  # The worker's own connections (least privilege) ...
  export AMQP_URL="${AMQP_URL:-amqp://$PW_RABBIT_USER:$PW_RABBIT_PASSWORD@127.0.0.1:$PW_AMQP_PORT/$(vhost_path)}"
  local pg; pg="$(pg_host)"
  export DATABASE_URL="${DATABASE_URL:-postgres://$PW_DB_USER:$PW_DB_PASSWORD@$pg:$PW_PG_PORT/$PW_DB_NAME}"
  export DATABASE_RUNTIME_ROLE="${DATABASE_RUNTIME_ROLE:-$PW_DB_USER}"
  # ... and the owner's, for migrate and seed; a publisher's, for send.
  export OWNER_DATABASE_URL="${OWNER_DATABASE_URL:-postgres://$PW_DB_OWNER:$PW_DB_OWNER_PASSWORD@$pg:$PW_PG_PORT/$PW_DB_NAME}"
  export PUBLISHER_AMQP_URL="${PUBLISHER_AMQP_URL:-amqp://$PW_PUBLISHER_USER:$PW_PUBLISHER_PASSWORD@127.0.0.1:$PW_AMQP_PORT/$(vhost_path)}"
  export BULK_PUBLISHER_AMQP_URL="${BULK_PUBLISHER_AMQP_URL:-amqp://$PW_BULK_PUBLISHER_USER:$PW_BULK_PUBLISHER_PASSWORD@127.0.0.1:$PW_AMQP_PORT/$(vhost_path)}"
  # The administrator's, for the tests' checks and the bench's own vhosts.
  export ADMIN_AMQP_URL="${ADMIN_AMQP_URL:-amqp://$PW_ADMIN_AMQP_USER:$PW_ADMIN_AMQP_PASSWORD@127.0.0.1:$PW_AMQP_PORT/$(vhost_path)}"
  # The email dispatcher's (it may only consume profile.email.dispatch).
  export DISPATCHER_AMQP_URL="${DISPATCHER_AMQP_URL:-amqp://$PW_DISPATCHER_USER:$PW_DISPATCHER_PASSWORD@127.0.0.1:$PW_AMQP_PORT/$(vhost_path)}"
  log "ready: worker as broker user $PW_RABBIT_USER and database role $PW_DB_USER; migrations as $PW_DB_OWNER"
}

# Debian's Prometheus and promtool, for the tests of deploy/prometheus (the
# package's service is not started: no systemd here, and the test runs its own).
ensure_prometheus() {
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && return
  apt_install prometheus
}

# What the publisher examples need (tests/integration/examples.rs): pika in a
# virtual environment of the project's own (target/examples-venv, exported as
# EXAMPLES_PYTHON; the system's Python is left alone), amqplib by `npm ci`.
ensure_examples() {
  local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local venv="$root/target/examples-venv"
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  fi
  # The email dispatcher with its tests' extras (locked, every file's hash
  # checked), the publisher example (pika) and the Kubernetes manifests'
  # offline validation. Reinstalled when a lock file changes.
  local stamp="$venv/.installed" locks
  locks="$(cat "$root/examples/dispatcher/requirements-test.lock" "$root/examples/python/requirements.txt" \
    "$root/deploy/kubernetes/requirements.txt" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$locks" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
      -r "$root/examples/dispatcher/requirements-test.lock"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      -r "$root/examples/python/requirements.txt" -r "$root/deploy/kubernetes/requirements.txt"
    echo "$locks" >"$stamp"
  fi
  export EXAMPLES_PYTHON="$venv/bin/python"
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  [ -d "$root/examples/node/node_modules/amqplib" ] ||
    (cd "$root/examples/node" && npm ci --no-audit --no-fund --silent)
}

# What every benchmark script needs: the servers, and the bench's URLs (it
# creates a database of its own through the owner's, and a vhost through the
# administrator's). DATABASE_QUERY (e.g. sslmode=disable) is added to the
# database URL.
bench_env() {
  ensure_rust
  ensure_services
  export DATABASE_URL="postgres://$PW_DB_OWNER:$PW_DB_OWNER_PASSWORD@$(pg_host):$PW_PG_PORT/postgres${DATABASE_QUERY:+?$DATABASE_QUERY}"
  export AMQP_URL="$ADMIN_AMQP_URL"
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
