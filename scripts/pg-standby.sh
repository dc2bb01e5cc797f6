#!/usr/bin/env bash
# A PostgreSQL primary with a synchronous streaming standby, on loopback, beside
# (not instead of) the server scripts/services.sh starts: two Debian clusters,
# `pwprimary` and `pwstandby`. The standby is made with pg_basebackup and named
# in the primary's synchronous_standby_names, so a commit the primary
# acknowledges is on both. The worker reaches them with libpq's multi-host URL:
#
#   postgres://profile_worker:…@127.0.0.1:5441,127.0.0.1:5442/profile_worker?target_session_attrs=read-write
#
#   scripts/pg-standby.sh start     create (if missing) and start both, wait until in sync
#   scripts/pg-standby.sh reset     drop both and make a fresh pair (after a failover)
#   scripts/pg-standby.sh crash     stop the primary with -m immediate (a crash)
#   scripts/pg-standby.sh promote   promote the standby; it takes writes from then on
#   scripts/pg-standby.sh stop      stop both
#   scripts/pg-standby.sh status    which port answers read-write
#
# Ports: PW_PG_PRIMARY_PORT (5441), PW_PG_STANDBY_PORT (5442). The owner and
# runtime roles are those of services.sh; replication runs as role
# `replicator`, allowed from 127.0.0.1 only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/services.sh"

PW_PG_PRIMARY_PORT="${PW_PG_PRIMARY_PORT:-5441}"
PW_PG_STANDBY_PORT="${PW_PG_STANDBY_PORT:-5442}"
PW_PG_REPLICATOR_PASSWORD="${PW_PG_REPLICATOR_PASSWORD:-replicator}"
PRIMARY=pwprimary
STANDBY=pwstandby

psql_at() { # PORT SQL…
  local port="$1"; shift
  as_root su postgres -c "psql -X -q -t -A -v ON_ERROR_STOP=1 -p $port" <<<"$*"
}

exists() { pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$(pg_version) $1"; }

create_primary() {
  local ver; ver="$(pg_version)"
  log "creating primary $ver/$PRIMARY on port $PW_PG_PRIMARY_PORT"
  as_root pg_createcluster "$ver" "$PRIMARY" -p "$PW_PG_PRIMARY_PORT" >/dev/null
  as_root tee "/etc/postgresql/$ver/$PRIMARY/conf.d/profile-worker.conf" >/dev/null <<CONF
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 5
synchronous_commit = on
CONF
  echo "host replication replicator 127.0.0.1/32 scram-sha-256" |
    as_root tee -a "/etc/postgresql/$ver/$PRIMARY/pg_hba.conf" >/dev/null
  as_root pg_ctlcluster "$ver" "$PRIMARY" start
  wait_port "$PW_PG_PRIMARY_PORT" 60 "PostgreSQL primary"
  psql_at "$PW_PG_PRIMARY_PORT" "CREATE ROLE replicator REPLICATION LOGIN PASSWORD '$PW_PG_REPLICATOR_PASSWORD';"
}

create_standby() {
  local ver; ver="$(pg_version)"
  log "creating standby $ver/$STANDBY on port $PW_PG_STANDBY_PORT (pg_basebackup)"
  as_root pg_createcluster "$ver" "$STANDBY" -p "$PW_PG_STANDBY_PORT" >/dev/null
  echo "listen_addresses = '127.0.0.1'" |
    as_root tee "/etc/postgresql/$ver/$STANDBY/conf.d/profile-worker.conf" >/dev/null
  local data="/var/lib/postgresql/$ver/$STANDBY"
  as_root rm -rf "$data"
  # -R writes standby.signal and primary_conninfo; application_name is the
  # name synchronous_standby_names waits for.
  as_root su postgres -c "pg_basebackup -D $data -R -X stream -c fast \
    -d 'host=127.0.0.1 port=$PW_PG_PRIMARY_PORT user=replicator password=$PW_PG_REPLICATOR_PASSWORD application_name=$STANDBY'"
  as_root pg_ctlcluster "$ver" "$STANDBY" start
  wait_port "$PW_PG_STANDBY_PORT" 60 "PostgreSQL standby"
}

# Commits wait for the standby from here on. Set only once the standby exists
# (until then every commit would wait), and in Debian's configuration
# directory, not the data directory: pg_basebackup copies the latter, and a
# promoted standby naming itself its own synchronous standby would wait for
# ever on every commit.
make_synchronous() {
  local ver f; ver="$(pg_version)"; f="/etc/postgresql/$ver/$PRIMARY/conf.d/profile-worker-sync.conf"
  [ -s "$f" ] && return
  echo "synchronous_standby_names = '$STANDBY'" | as_root tee "$f" >/dev/null
  as_root pg_ctlcluster "$ver" "$PRIMARY" reload
}

await_sync() {
  local i
  for ((i = 0; i < 120; i++)); do
    [ "$(psql_at "$PW_PG_PRIMARY_PORT" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$STANDBY'" 2>/dev/null)" = sync ] && return 0
    sleep 0.5
  done
  log "the standby did not become synchronous within 60 s"
  return 1
}

cmd_start() {
  [ -n "$(pg_version)" ] || apt_install postgresql ssl-cert
  local ver; ver="$(pg_version)"
  # A pair that failed over (the standby promoted) is made afresh: the old
  # primary would come back as a second primary.
  if exists "$STANDBY" && ! as_root test -e "/var/lib/postgresql/$ver/$STANDBY/standby.signal"; then
    log "the standby was promoted; making a fresh pair"
    drop_pair
  fi
  if exists "$PRIMARY"; then
    port_open "$PW_PG_PRIMARY_PORT" || as_root pg_ctlcluster "$ver" "$PRIMARY" start
    wait_port "$PW_PG_PRIMARY_PORT" 60 "PostgreSQL primary"
  else
    create_primary
  fi
  # An existing standby first: the primary may already be synchronous, and
  # then every commit (the roles' below included) waits for it.
  if exists "$STANDBY"; then
    port_open "$PW_PG_STANDBY_PORT" || as_root pg_ctlcluster "$ver" "$STANDBY" start
    wait_port "$PW_PG_STANDBY_PORT" 60 "PostgreSQL standby"
  fi
  # Roles and database before a new standby is copied, so its copy has them.
  pg_roles "$PW_PG_PRIMARY_PORT" >/dev/null
  exists "$STANDBY" || create_standby
  make_synchronous
  await_sync
  log "primary 127.0.0.1:$PW_PG_PRIMARY_PORT, synchronous standby 127.0.0.1:$PW_PG_STANDBY_PORT"
}

cmd_stop() {
  local ver; ver="$(pg_version)"
  for c in "$STANDBY" "$PRIMARY"; do
    exists "$c" && as_root pg_ctlcluster "$ver" "$c" stop -m fast >/dev/null 2>&1 || true
  done
}

drop_pair() {
  local ver; ver="$(pg_version)"
  for c in "$STANDBY" "$PRIMARY"; do
    exists "$c" && as_root pg_dropcluster --stop "$ver" "$c"
    # pg_dropcluster keeps a configuration directory holding files of ours.
    as_root rm -rf "/etc/postgresql/$ver/$c"
  done
}

cmd_reset() {
  drop_pair
  cmd_start
}

cmd_crash() {
  log "stopping the primary with -m immediate"
  as_root pg_ctlcluster "$(pg_version)" "$PRIMARY" stop -m immediate
}

cmd_promote() {
  log "promoting the standby"
  as_root pg_ctlcluster "$(pg_version)" "$STANDBY" promote
}

cmd_status() {
  for p in "$PW_PG_PRIMARY_PORT" "$PW_PG_STANDBY_PORT"; do
    printf '%s %s\n' "$p" "$(psql_at "$p" "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END" 2>/dev/null || echo down)"
  done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  what="${1:-start}"; shift || true
  case "$what" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    reset) cmd_reset ;;
    crash) cmd_crash ;;
    promote) cmd_promote ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|reset|crash|promote|status" >&2; exit 2 ;;
  esac
fi
