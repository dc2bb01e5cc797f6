-- The batch's two statements (src/store/sql/) exchange typed rows, one
-- composite type per table and direction, instead of one array per column:
-- the Rust side binds them by field name (postgres-types' derive), so two
-- columns of one type cannot be swapped by position. Types are usable by
-- every role (PostgreSQL grants USAGE on types to PUBLIC), so the runtime
-- role needs no grant.

-- COMMIT's input. `n` is the record's index in its batch: a row of a ticket,
-- a token, an event or an email claim is written only if its record is.
CREATE TYPE profile_worker_record_row AS (
    n           int4,
    message_id  text,
    command     text,
    status      int2,
    reply       text,
    fingerprint bytea
);
CREATE TYPE profile_worker_ticket_row AS (
    n                 int4,
    id                uuid,
    tenant            text,
    profile_id        text,
    last_request_time timestamptz
);
CREATE TYPE profile_worker_verification_token_row AS (
    n           int4,
    id          uuid,
    tenant      text,
    profile_id  text,
    "timestamp" timestamptz
);
CREATE TYPE profile_worker_outbox_row AS (
    n           int4,
    event_id    uuid,
    routing_key text,
    body        text,
    traceparent text,
    tracestate  text
);
CREATE TYPE profile_worker_email_claim_row AS (
    n            int4,
    profile_id   text,
    purpose      text,
    requested_at timestamptz
);

-- LOAD's output: one array of each per batch. Times as epoch milliseconds,
-- as the domain counts them.
CREATE TYPE profile_worker_loaded_token AS (
    id_sha256          bytea,
    application        text,
    expires_ms         int8,
    tenant_permissions jsonb
);
CREATE TYPE profile_worker_loaded_profile AS (
    id         text,
    tenant     text,
    email      text,
    enabled    bool,
    link_hosts text[]
);
CREATE TYPE profile_worker_loaded_reply AS (
    message_id  text,
    command     text,
    status      int2,
    reply       text,
    fingerprint bytea
);
CREATE TYPE profile_worker_loaded_event AS (
    message_id  text,
    event_id    uuid,
    routing_key text,
    body        text,
    traceparent text,
    tracestate  text
);
CREATE TYPE profile_worker_loaded_email AS (
    profile_id   text,
    purpose      text,
    requested_ms int8
);
