#!/bin/sh
# One-shot: the worker's broker user, limited to its own exchanges and queues
# (configure, read) and the default exchange (write: replies), made through the
# management API of the compose RabbitMQ.
set -eu
api="http://rabbitmq:15672/api"
auth="admin:${RABBITMQ_ADMIN_PASSWORD}"
names='profile\\.(commands(\\.(dlx|dead|unrouted))?|events)'
curl -fsS -u "$auth" -X PUT -H 'content-type: application/json' \
  -d "{\"password\":\"${WORKER_AMQP_PASSWORD}\",\"tags\":\"\"}" "$api/users/profile-worker"
curl -fsS -u "$auth" -X PUT -H 'content-type: application/json' \
  -d "{\"configure\":\"^${names}\$\",\"write\":\"^(amq\\\\.default|${names})\$\",\"read\":\"^${names}\$\"}" \
  "$api/permissions/%2F/profile-worker"
echo "broker user profile-worker ready"
