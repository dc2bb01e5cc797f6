-- The whole batch as one statement: one round trip and one implicit
-- transaction. Each parameter is one row-set per table (migration 6's types);
-- `n` ties a row to its record, the record's index in the batch.
--
-- Parameters: $1 records, $2 outbox events the broker confirmed (deleted on the
-- way), $3 tickets, $4 verification tokens, $5 outbox events, $6 email claims,
-- $7 the email cooldown in seconds, $8 and $9 the versions of the access tokens
-- and profiles the batch was decided on (migration 7), $10 the server they
-- were read on (its start time in µs, as load.sql gives it; NULL: none read).
WITH batch AS (
    SELECT * FROM unnest($1::profile_worker_record_row[])
),
-- Idempotency records. A message_id another transaction committed first
-- (two workers, or a publisher's retry racing the original) is not won here:
-- its command is answered from the stored record instead.
won AS (
    INSERT INTO processed_commands (message_id, command, status, reply, fingerprint)
    SELECT b.message_id, b.command, b.status, b.reply, b.fingerprint
    FROM batch b
    WHERE b.message_id IS NOT NULL
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
-- The records this statement writes: those without a message_id, and those
-- whose message_id it won. Every row below is written only for one of these.
kept AS (
    SELECT b.n, b.message_id
    FROM batch b
    WHERE b.message_id IS NULL OR b.message_id IN (SELECT message_id FROM won)
),
-- Events the broker confirmed since the last commit: their rows go now rather
-- than in a transaction of their own.
confirmed AS (
    DELETE FROM outbox WHERE event_id = ANY($2::uuid[])
),
tickets_written AS (
    INSERT INTO tickets (id, tenant, profile_id, last_request_time)
    SELECT x.id, x.tenant, x.profile_id, x.last_request_time
    FROM unnest($3::profile_worker_ticket_row[]) x
    JOIN kept USING (n)
),
tokens_written AS (
    INSERT INTO verification_tokens (id, tenant, profile_id, "timestamp")
    SELECT x.id, x.tenant, x.profile_id, x."timestamp"
    FROM unnest($4::profile_worker_verification_token_row[]) x
    JOIN kept USING (n)
),
-- Each event in the same transaction as the row it announces (the outbox).
events_written AS (
    INSERT INTO outbox (event_id, message_id, routing_key, body, traceparent, tracestate)
    SELECT x.event_id, kept.message_id, x.routing_key, x.body, x.traceparent, x.tracestate
    FROM unnest($5::profile_worker_outbox_row[]) x
    JOIN kept USING (n)
),
wanted AS (
    SELECT x.profile_id, x.purpose, x.requested_at
    FROM unnest($6::profile_worker_email_claim_row[]) x
    JOIN kept USING (n)
),
-- An email claim takes its (profile, purpose) row only if the last email
-- there is a whole cooldown old.
claimed AS (
    INSERT INTO email_cooldowns AS c (profile_id, purpose, requested_at)
    SELECT * FROM wanted
    ON CONFLICT (profile_id, purpose) DO UPDATE SET requested_at = EXCLUDED.requested_at
    WHERE c.requested_at <= EXCLUDED.requested_at - make_interval(secs => $7::float8)
    RETURNING 1
)
SELECT n FROM kept
UNION ALL
-- A claim that found its row taken (another batch committed an email in the
-- meantime) aborts the statement as a serialization failure, so the batch is
-- retried and decided again against what was committed.
SELECT NULL WHERE CASE WHEN (SELECT count(*) FROM claimed) <> (SELECT count(*) FROM wanted)
    THEN profile_worker_cooldown_taken() ELSE false END
UNION ALL
-- A token, profile or tenant that is no longer the version the batch was
-- decided on (revoked, disabled, changed; read by an earlier batch, or by this
-- one's load before another transaction wrote it) aborts the statement, and the
-- batch is decided again on the rows as they are now. Each lookup is by key.
-- Versions read on another server (a failover, a restore) are no evidence
-- here: the same check fails.
SELECT NULL WHERE CASE WHEN
    $10::int8 <> (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8
    OR EXISTS (
        SELECT 1 FROM unnest($8::profile_worker_token_version[]) v
        WHERE NOT EXISTS (
            SELECT 1 FROM access_tokens t
            WHERE t.id_sha256 = v.id_sha256 AND t.xmin::text::int8 = v.xmin))
    OR EXISTS (
        SELECT 1 FROM unnest($9::profile_worker_profile_version[]) v
        WHERE NOT EXISTS (
                SELECT 1 FROM profiles p WHERE p.id = v.id AND p.xmin::text::int8 = v.xmin)
            OR CASE WHEN v.tenant_xmin IS NULL
                THEN EXISTS (SELECT 1 FROM tenants tn WHERE tn.name = v.tenant)
                ELSE NOT EXISTS (SELECT 1 FROM tenants tn
                                 WHERE tn.name = v.tenant AND tn.xmin::text::int8 = v.tenant_xmin)
            END)
    THEN profile_worker_rows_changed() ELSE false END
