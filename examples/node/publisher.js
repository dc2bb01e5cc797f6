// A Node.js publisher of profile-worker commands, with amqplib.
//
// Shows the things a caller does:
//   1. request/reply with RabbitMQ's direct reply-to (no reply queue to create);
//   2. fire-and-forget with publisher confirms (no replyTo: the worker still
//      processes the command and publishes its events, it answers nobody);
//   3. reading a reply's integer `status` header and, for errors, its body
//      {"errorCode": ..., "message": ...};
//   4. an import: many commands no one waits on, into the bulk lane
//      (profile.commands.bulk), as the importer's broker user, which may
//      publish there only. The worker takes interactive commands first, so an
//      import never holds up a login (CONTRACT §1).
//
// The conventions that matter (CONTRACT §2, §4):
//   - the AMQP `type` property and the routing key are the command's name;
//   - `messageId` is the idempotency key: generate it once per command and keep
//     it across your own retries (a retry gets the same reply, creates nothing);
//   - the body is raw JSON (contentType application/json), no envelope;
//   - the reply's `status` is an integer header, its correlationId is yours.
//
// Run (the worker running, e.g. ./scripts/run.sh; `npm ci` here first):
//   AMQP_URL=amqp://profile-publisher:profile-publisher@127.0.0.1:5672/profile-worker-dev \
//   ACCESS_TOKEN_ID=<an access token id> PROFILE_ID=5925a68def86951f895cf497 \
//   node examples/node/publisher.js
"use strict";

const amqp = require("amqplib");
const crypto = require("node:crypto");

const DIRECT_REPLY_TO = "amq.rabbitmq.reply-to";

class Publisher {
  static async open(url, exchange) {
    const connection = await amqp.connect(url);
    const channel = await connection.createConfirmChannel();
    const p = new Publisher(connection, channel, exchange);
    // Direct reply-to: consume the pseudo-queue (noAck is required) on the
    // channel that publishes, before publishing.
    await channel.consume(DIRECT_REPLY_TO, (msg) => p.onReply(msg), { noAck: true });
    return p;
  }

  constructor(connection, channel, exchange) {
    this.connection = connection;
    this.channel = channel;
    this.exchange = exchange;
    this.waiting = new Map();
  }

  onReply(msg) {
    const waiter = this.waiting.get(msg.properties.correlationId);
    if (!waiter) return;
    this.waiting.delete(msg.properties.correlationId);
    const status = Number((msg.properties.headers || {}).status ?? -1);
    waiter.resolve({ status, body: JSON.parse(msg.content.toString("utf8")) });
  }

  properties(command, messageId, replyTo) {
    const now = Date.now();
    const p = {
      type: command,
      contentType: "application/json",
      messageId,
      correlationId: messageId,
      persistent: true,
      mandatory: true,
      timestamp: Math.floor(now / 1000),
      headers: { timestamp_in_ms: now },
    };
    if (replyTo) p.replyTo = replyTo;
    return p;
  }

  publish(command, body, props) {
    return new Promise((resolve, reject) => {
      this.channel.publish(this.exchange, command, Buffer.from(JSON.stringify(body)), props, (err) =>
        err ? reject(new Error(`the broker refused ${command}: ${err}`)) : resolve(),
      );
    });
  }

  // Publishes and waits for the reply: {status, body}.
  async call(command, body, messageId = crypto.randomUUID(), timeoutMs = 10000) {
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(messageId);
        reject(new Error(`no reply to ${messageId} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(messageId, {
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
      });
    });
    await this.publish(command, body, this.properties(command, messageId, DIRECT_REPLY_TO));
    return reply;
  }

  // Fire and forget: resolves once the broker confirmed the command.
  async send(command, body, messageId = crypto.randomUUID()) {
    await this.publish(command, body, this.properties(command, messageId, null));
    return messageId;
  }

  async close() {
    await this.channel.close();
    await this.connection.close();
  }
}

async function main() {
  // The publisher user scripts/services.sh and compose make: it may publish
  // commands and read its replies, nothing else.
  const url = process.env.AMQP_URL || "amqp://profile-publisher:profile-publisher@127.0.0.1:5672/%2f";
  const exchange = process.env.COMMAND_EXCHANGE || "profile.commands";
  const token = process.env.ACCESS_TOKEN_ID;
  const profile = process.env.PROFILE_ID || "5925a68def86951f895cf497";
  if (!token) throw new Error("ACCESS_TOKEN_ID is not set");
  const p = await Publisher.open(url, exchange);
  try {
    const t = await p.call("create-ticket", { accessTokenId: token, profileId: profile });
    console.log(`create-ticket: ${t.status} ticket ${t.body.id}`);

    // The same messageId again: the same reply, no second ticket.
    const mid = crypto.randomUUID();
    const first = await p.call("create-ticket", { accessTokenId: token, profileId: profile }, mid);
    const again = await p.call("create-ticket", { accessTokenId: token, profileId: profile }, mid);
    const same = JSON.stringify(first) === JSON.stringify(again);
    console.log(`retry with the same id: same reply ${same ? "True" : "False"}`);

    const sent = await p.send("create-verification-token", { accessTokenId: token, id: profile });
    console.log(`create-verification-token sent and confirmed: ${sent}`);

    const e = await p.call("create-ticket", { accessTokenId: "no-such-token", profileId: profile });
    console.log(`unknown token: ${e.status} ${e.body.errorCode}: ${e.body.message}`);
  } finally {
    await p.close();
  }

  // An import, through the bulk lane, as the importer's user (BULK_AMQP_URL).
  if (process.env.BULK_AMQP_URL) {
    const importer = await Publisher.open(
      process.env.BULK_AMQP_URL,
      process.env.BULK_EXCHANGE || "profile.commands.bulk",
    );
    try {
      const ids = [];
      for (let i = 0; i < 3; i++) {
        ids.push(await importer.send("create-ticket", { accessTokenId: token, profileId: profile }));
      }
      console.log(`imported through the bulk lane: ${ids.length} commands confirmed`);
    } finally {
      await importer.close();
    }
  }
}

main().catch((e) => {
  console.error(e.message || e);
  process.exit(1);
});
