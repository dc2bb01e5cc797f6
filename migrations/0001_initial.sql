-- Tables other services may read (CONTRACT §7): tenants, access_tokens, profiles,
-- tickets, verification_tokens. Times are timestamptz; replies carry epoch milliseconds.

CREATE TABLE tenants (
    name                text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
    verify_new_profiles boolean NOT NULL DEFAULT false
);

CREATE TABLE access_tokens (
    id                 text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    application        text NOT NULL,
    master             boolean NOT NULL DEFAULT false,
    expires_on         timestamptz,
    -- [{"tenant": "default" | "*", "allowedActions": ["MANAGE_PROFILES", ...]}]
    tenant_permissions jsonb NOT NULL DEFAULT '[]'::jsonb
);

CREATE TABLE profiles (
    id          text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    tenant      text NOT NULL REFERENCES tenants (name),
    username    text NOT NULL,
    email       text NOT NULL,
    enabled     boolean NOT NULL DEFAULT false,
    verified    boolean NOT NULL DEFAULT false,
    roles       jsonb NOT NULL DEFAULT '[]'::jsonb,
    attributes  jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE tickets (
    id                uuid PRIMARY KEY,
    tenant            text NOT NULL,
    profile_id        text NOT NULL,
    last_request_time timestamptz NOT NULL
);
CREATE INDEX tickets_last_request_time ON tickets (last_request_time);
CREATE INDEX tickets_profile_id ON tickets (profile_id);

CREATE TABLE verification_tokens (
    id         uuid PRIMARY KEY,
    tenant     text NOT NULL,
    profile_id text NOT NULL,
    "timestamp" timestamptz NOT NULL
);
CREATE INDEX verification_tokens_timestamp ON verification_tokens ("timestamp");
CREATE INDEX verification_tokens_profile_id ON verification_tokens (profile_id);

-- The worker's own bookkeeping.

-- Idempotency record: one row per processed message_id, written in the same
-- transaction as the ticket or token, holding the exact reply that was sent.
CREATE TABLE processed_commands (
    message_id   text PRIMARY KEY,
    command      text NOT NULL,
    status       smallint NOT NULL,
    reply        text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_commands_processed_at ON processed_commands (processed_at);

-- Transactional outbox: events committed with their rows, deleted once the broker
-- confirmed them. Rows older than a grace period are re-published by the relay.
CREATE TABLE outbox (
    event_id    uuid PRIMARY KEY,
    message_id  text,
    routing_key text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_message_id ON outbox (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX outbox_created_at ON outbox (created_at);
