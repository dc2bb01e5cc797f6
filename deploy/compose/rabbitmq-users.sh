#!/bin/sh
# One-shot, through the management API of the compose RabbitMQ: the broker users
# of CONTRACT §1 (docs/OPERATIONS.md, "Who may read what"), the same regexes as
# scripts/services.sh's rabbit_users.
#   profile-worker:            its own exchanges and queues, the default exchange (replies)
#   profile-email-dispatcher:  consumes profile.email.dispatch; writes only to profile.email.dlx (its dead letters)
#   profile-events-reader:     its own queues, bound to profile.events; no right on profile.email
#   profile-publisher:         publishes commands (and uses direct reply-to)
#   profile-bulk-publisher:    publishes commands to the bulk lane only (imports, provision)
#   profile-keda:              management API only (tag management): queue depths for KEDA; no AMQP right
set -eu
api="http://rabbitmq:15672/api"
auth="admin:${RABBITMQ_ADMIN_PASSWORD}"

# USER PASSWORD CONFIGURE WRITE READ [TAGS] (regexes as JSON string contents: \\ is one backslash)
user() {
  curl -fsS -u "$auth" -X PUT -H 'content-type: application/json' \
    -d "{\"password\":\"$2\",\"tags\":\"${6:-}\"}" "$api/users/$1"
  curl -fsS -u "$auth" -X PUT -H 'content-type: application/json' \
    -d "{\"configure\":\"$3\",\"write\":\"$4\",\"read\":\"$5\"}" "$api/permissions/%2F/$1"
  echo "broker user $1 ready"
}

names='profile\\.(commands(\\.(dlx|dead|unrouted|bulk(\\.unrouted)?))?|events|email(\\.(dlx|dispatch(\\.dead)?))?)'
user profile-worker "${WORKER_AMQP_PASSWORD}" "^${names}\$" "^(amq\\\\.default|${names})\$" \
  '^profile\\.(commands(\\.(dlx|unrouted|bulk(\\.unrouted)?))?|email(\\.(dlx|dispatch))?)$'
user profile-email-dispatcher "${DISPATCHER_AMQP_PASSWORD}" '^$' '^profile\\.email\\.dlx$' '^profile\\.email\\.dispatch$'
mine='(amq\\.gen-.*|profile-events-reader\\..*)'
user profile-events-reader "${EVENTS_READER_AMQP_PASSWORD}" "^${mine}\$" "^${mine}\$" "^(${mine}|profile\\\\.events)\$"
# Publishers: write on the command exchange; a server-named reply queue needs
# configure and read on amq.gen-… (direct reply-to needs neither).
user profile-publisher "${PUBLISHER_AMQP_PASSWORD}" '^amq\\.gen-.*$' '^profile\\.commands$' '^amq\\.gen-.*$'
# An importer (batch provisioning): writes to the bulk lane's exchange only.
user profile-bulk-publisher "${BULK_PUBLISHER_AMQP_PASSWORD}" '^amq\\.gen-.*$' '^profile\\.commands\\.bulk$' '^amq\\.gen-.*$'
# KEDA's rabbitmq scaler reads queue depths through the management API: the
# management tag, and access to the vhost with no right on any object.
user profile-keda "${KEDA_PASSWORD}" '^$' '^$' '^$' management
