#!/usr/bin/env bash
# Quick start: installs/starts RabbitMQ and PostgreSQL if needed, builds the worker,
# applies migrations, seeds seeds/example.json and runs the worker in the foreground.
# Extra arguments go to `profile-worker run` (see `profile-worker run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
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

profile-worker is starting. In another shell, send a first command:

  AMQP_URL='$PUBLISHER_AMQP_URL' $PWD/$bin send create-ticket '{"accessTokenId":"$token","profileId":"5925a68def86951f895cf497"}'
  AMQP_URL='$PUBLISHER_AMQP_URL' $PWD/$bin send create-verification-token '{"accessTokenId":"$token","id":"592715d4d4c650e226b03b62"}'

Stop with Ctrl-C (SIGINT) or SIGTERM.

MSG
exec "$bin" run "$@"
