#!/usr/bin/env bash
# Quick start: installs/starts RabbitMQ and PostgreSQL if needed, builds the worker,
# applies migrations, seeds seeds/example.json (tenants and profiles), makes a
# fresh access token (written once, into the command files the `send` lines
# printed below read; it expires in a day) and runs the worker in the foreground.
# Extra arguments go to `profile-worker run` (see `profile-worker run --help`).
#
# It works in its own development database (profile_worker_dev) and broker vhost
# (profile-worker-dev), never in whatever DATABASE_URL or AMQP_URL the shell
# happens to have: making tokens in someone's real database is not a quick start. PW_DB_NAME and PW_RABBIT_VHOST choose others; PW_USE_ENV=1
# uses the shell's DATABASE_URL, OWNER_DATABASE_URL, AMQP_URL and
# PUBLISHER_AMQP_URL as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${PW_USE_ENV:-0}" != 1 ]; then
  for v in DATABASE_URL OWNER_DATABASE_URL AMQP_URL PUBLISHER_AMQP_URL DATABASE_RUNTIME_ROLE; do
    if [ -n "${!v:-}" ]; then
      printf '[run] ignoring %s from the shell (PW_USE_ENV=1 uses it)\n' "$v" >&2
      unset "$v"
    fi
  done
  export PW_DB_NAME="${PW_DB_NAME:-profile_worker_dev}"
  export PW_RABBIT_VHOST="${PW_RABBIT_VHOST:-profile-worker-dev}"
fi
source scripts/services.sh
ensure_rust
ensure_services
cargo build --release --locked
bin=target/release/profile-worker
# Schema changes and seeding as the owner; the worker itself runs with row rights
# only, as a broker user limited to its own objects (scripts/services.sh).
DATABASE_URL="$OWNER_DATABASE_URL" "$bin" migrate
DATABASE_URL="$OWNER_DATABASE_URL" "$bin" seed seeds/example.json
# Earlier versions seeded a token whose ID stood in this repository: revoked
# if a database still has it (read from stdin, so it is in no process list).
echo af59d9dc-bf78-4018-bbf2-2e4f788524b6 |
  DATABASE_URL="$OWNER_DATABASE_URL" "$bin" access-tokens revoke >/dev/null 2>&1 || true
# No token is ever published: this one is made now, at random, and written
# only into the two command files below (mode 600), which `send` reads on its
# standard input: a token in an argument is visible to every user of the
# machine (ps, /proc) and stays in the shell's history.
commands="$PWD/target/quickstart"
mkdir -p "$commands"
chmod 700 "$commands"
token="$(DATABASE_URL="$OWNER_DATABASE_URL" "$bin" access-tokens create \
  --application profile-worker-quickstart --tenant '*=MANAGE_PROFILES,MANAGE_TICKETS' --expires-in 24h 2>/dev/null)"
(
  umask 077
  printf '{"accessTokenId":"%s","profileId":"5925a68def86951f895cf497"}\n' "$token" >"$commands/create-ticket.json"
  printf '{"accessTokenId":"%s","id":"592715d4d4c650e226b03b62"}\n' "$token" >"$commands/create-verification-token.json"
)
unset token
# The base of the link in every verification email (required, no default):
# a local page here; plain http is allowed on a loopback host only.
export VERIFICATION_URL="${VERIFICATION_URL:-http://localhost:8080/verify}"
cat <<MSG

profile-worker is starting: database ${PW_DB_NAME:-from DATABASE_URL}, vhost ${PW_RABBIT_VHOST:-from AMQP_URL}. In another shell, send a first command:

  AMQP_URL='$PUBLISHER_AMQP_URL' $PWD/$bin send create-ticket < $commands/create-ticket.json
  AMQP_URL='$PUBLISHER_AMQP_URL' $PWD/$bin send create-verification-token < $commands/create-verification-token.json

The access token in those files was made just now (application profile-worker-quickstart,
expires in 24 h); make others with: DATABASE_URL='$OWNER_DATABASE_URL' $PWD/$bin access-tokens create --help
Verification links start with VERIFICATION_URL=$VERIFICATION_URL.
The email dispatcher's broker URL (it may only consume profile.email.dispatch): $DISPATCHER_AMQP_URL

Stop with Ctrl-C (SIGINT) or SIGTERM.

MSG
exec "$bin" run "$@"
