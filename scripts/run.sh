#!/usr/bin/env bash
# Quick start: installs/starts RabbitMQ and PostgreSQL if needed, builds the worker,
# applies migrations, seeds seeds/example.json (with a master access token) and
# runs the worker in the foreground.
# Extra arguments go to `profile-worker run` (see `profile-worker run --help`).
#
# It works in its own development database (profile_worker_dev) and broker vhost
# (profile-worker-dev), never in whatever DATABASE_URL or AMQP_URL the shell
# happens to have: seeding a master token into someone's real database is not
# a quick start. PW_DB_NAME and PW_RABBIT_VHOST choose others; PW_USE_ENV=1
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
token="$(sed -n 's/.*"id": "\([0-9a-f-]\{36\}\)", "application".*/\1/p' seeds/example.json | head -1)"
cat <<MSG

profile-worker is starting: database ${PW_DB_NAME:-from DATABASE_URL}, vhost ${PW_RABBIT_VHOST:-from AMQP_URL}. In another shell, send a first command:

  AMQP_URL='$PUBLISHER_AMQP_URL' $PWD/$bin send create-ticket '{"accessTokenId":"$token","profileId":"5925a68def86951f895cf497"}'
  AMQP_URL='$PUBLISHER_AMQP_URL' $PWD/$bin send create-verification-token '{"accessTokenId":"$token","id":"592715d4d4c650e226b03b62"}'

Stop with Ctrl-C (SIGINT) or SIGTERM.

MSG
exec "$bin" run "$@"
