"""A Python publisher of profile-worker commands, with pika.

Shows the things a caller does:
  1. request/reply with RabbitMQ's direct reply-to (no reply queue to create);
  2. fire-and-forget with publisher confirms (no reply_to: the worker still
     processes the command and publishes its events, it just answers nobody);
  3. reading a reply's integer `status` header and, for errors, its body
     {"errorCode": ..., "message": ...};
  4. an import: many commands no one waits on, into the bulk lane
     (profile.commands.bulk), as the importer's broker user, which may publish
     there only. The worker takes interactive commands first, so an import
     never holds up a login (CONTRACT §1).

The conventions that matter (CONTRACT §2, §4):
  - the AMQP `type` property and the routing key are the command's name;
  - `message_id` is the idempotency key: a retry with the same id gets the
    same reply and creates nothing twice, so generate it once per command and
    keep it across your own retries;
  - the body is raw JSON (content_type application/json), no envelope;
  - the reply's `status` is an integer header, its `correlation_id` is yours.

Run (the worker running, e.g. ./scripts/run.sh):
  AMQP_URL=amqp://profile-publisher:profile-publisher@127.0.0.1:5672/profile-worker-dev \
  ACCESS_TOKEN_ID=<an access token id> PROFILE_ID=5925a68def86951f895cf497 \
  python3 examples/python/publisher.py
"""

import json
import os
import sys
import time
import uuid

import pika

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class Publisher:
    def __init__(self, url, exchange):
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        # Direct reply-to: consume the pseudo-queue (no_ack is required)
        # before publishing on the same channel.
        self.replies = {}
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
        self.channel.confirm_delivery()

    def _on_reply(self, _channel, _method, properties, body):
        self.replies[properties.correlation_id] = (properties, body)

    def _properties(self, command, message_id, reply_to):
        now_ms = int(time.time() * 1000)
        return pika.BasicProperties(
            type=command,
            content_type="application/json",
            message_id=message_id,
            correlation_id=message_id,
            reply_to=reply_to,
            delivery_mode=2,
            timestamp=now_ms // 1000,
            headers={"timestamp_in_ms": now_ms},
        )

    def call(self, command, body, message_id=None, timeout=10.0):
        """Publishes and waits for the reply: (status, parsed body)."""
        message_id = message_id or str(uuid.uuid4())
        # With confirm_delivery, basic_publish raises if the broker refuses.
        self.channel.basic_publish(
            self.exchange,
            command,
            json.dumps(body).encode(),
            self._properties(command, message_id, DIRECT_REPLY_TO),
            mandatory=True,
        )
        deadline = time.monotonic() + timeout
        while message_id not in self.replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {message_id} within {timeout} s")
            self.connection.process_data_events(time_limit=0.1)
        properties, raw = self.replies.pop(message_id)
        status = int((properties.headers or {}).get("status", -1))
        return status, json.loads(raw)

    def send(self, command, body, message_id=None):
        """Fire and forget: returns once the broker confirmed the command."""
        message_id = message_id or str(uuid.uuid4())
        self.channel.basic_publish(
            self.exchange,
            command,
            json.dumps(body).encode(),
            self._properties(command, message_id, None),
            mandatory=True,
        )
        return message_id

    def close(self):
        self.connection.close()


def main():
    # The publisher user scripts/services.sh and compose make: it may publish
    # commands and read its replies, nothing else.
    url = os.environ.get("AMQP_URL", "amqp://profile-publisher:profile-publisher@127.0.0.1:5672/%2f")
    exchange = os.environ.get("COMMAND_EXCHANGE", "profile.commands")
    token = os.environ["ACCESS_TOKEN_ID"]
    profile = os.environ.get("PROFILE_ID", "5925a68def86951f895cf497")
    p = Publisher(url, exchange)
    try:
        status, ticket = p.call("create-ticket", {"accessTokenId": token, "profileId": profile})
        print(f"create-ticket: {status} ticket {ticket.get('id')}")

        # The same message_id again: the same reply, no second ticket.
        mid = str(uuid.uuid4())
        first = p.call("create-ticket", {"accessTokenId": token, "profileId": profile}, mid)
        again = p.call("create-ticket", {"accessTokenId": token, "profileId": profile}, mid)
        print(f"retry with the same id: same reply {first == again}")

        mid = p.send("create-verification-token", {"accessTokenId": token, "id": profile})
        print(f"create-verification-token sent and confirmed: {mid}")

        status, error = p.call("create-ticket", {"accessTokenId": "no-such-token", "profileId": profile})
        print(f"unknown token: {status} {error['errorCode']}: {error['message']}")
    finally:
        p.close()

    # An import, through the bulk lane, as the importer's user (BULK_AMQP_URL).
    bulk_url = os.environ.get("BULK_AMQP_URL")
    if bulk_url:
        importer = Publisher(bulk_url, os.environ.get("BULK_EXCHANGE", "profile.commands.bulk"))
        try:
            ids = [importer.send("create-ticket", {"accessTokenId": token, "profileId": profile}) for _ in range(3)]
            print(f"imported through the bulk lane: {len(ids)} commands confirmed")
        finally:
            importer.close()


if __name__ == "__main__":
    sys.exit(main())
