-- Everything a batch reads, as one statement returning one row: one
-- Bind/Execute/Sync and one reply to wait for. Pipelined as separate
-- statements, each reply is its own wake-up of the connection task and the
-- caller, which cost more than the lookups themselves
-- (bench/archive/BENCHMARKS-to-2026-12-07.md, "Where the time goes").
--
-- Parameters: $1 the SHA-256 of each access token ID, $2 profile IDs,
-- $3 message_ids. Every lookup is `= ANY(...)` on an index: with sequential
-- scans off (see `Store::connect`) an index scan, whatever the table's size
-- and statistics and the batch's size. (A join against `unnest($1)` was
-- planned as a hash join over a sequential scan of the whole table while the
-- table was small.)
SELECT
    -- The access tokens the commands name. The table holds hashes only
    -- (CONTRACT §7); the caller keeps each row under the ID it hashed. Each
    -- with its version (xmin), which the commit checks (migration 7).
    ARRAY(
        SELECT ROW(t.id_sha256, t.application,
                   (extract(epoch FROM t.expires_on) * 1000)::int8,
                   t.tenant_permissions,
                   t.xmin::text::int8)::profile_worker_known_token
        FROM access_tokens t
        WHERE t.id_sha256 = ANY($1::bytea[])
    ) AS tokens,
    -- The profiles, each with its tenant's link hosts (NULL: any host), and
    -- the versions of both rows (the tenant's NULL when it has no row).
    ARRAY(
        SELECT ROW(p.id, p.tenant, p.email, p.enabled, tn.link_hosts,
                   p.xmin::text::int8,
                   tn.xmin::text::int8)::profile_worker_known_profile
        FROM profiles p
        LEFT JOIN tenants tn ON tn.name = p.tenant
        WHERE p.id = ANY($2::text[])
    ) AS profiles,
    -- Commands processed before under these message_ids: their stored replies.
    ARRAY(
        SELECT ROW(c.message_id, c.command, c.status, c.reply,
                   c.fingerprint)::profile_worker_loaded_reply
        FROM processed_commands c
        WHERE c.message_id = ANY($3::text[])
    ) AS replies,
    -- Their events still in the outbox (the worker died between commit and
    -- confirm), in the order they were written, which is the order they are
    -- published again in. Through the partial index on message_id.
    ARRAY(
        SELECT ROW(o.message_id, o.event_id, o.routing_key, o.body,
                   o.traceparent, o.tracestate)::profile_worker_loaded_event
        FROM outbox o
        WHERE o.message_id = ANY($3::text[])
        ORDER BY o.created_at, o.event_id
    ) AS pending_events,
    -- When each of these profiles was last sent an email, per purpose.
    ARRAY(
        SELECT ROW(c.profile_id, c.purpose,
                   (extract(epoch FROM c.requested_at) * 1000)::int8)::profile_worker_loaded_email
        FROM email_cooldowns c
        WHERE c.profile_id = ANY($2::text[])
    ) AS last_emails,
    -- The loaded profiles' locale attributes, by profile ID, for their email
    -- requests (a jsonb object; NULL when none has one).
    (SELECT jsonb_object_agg(p.id, p.attributes->>'locale')
     FROM profiles p
     WHERE p.id = ANY($2::text[]) AND jsonb_typeof(p.attributes->'locale') = 'string') AS locales,
    -- Which server answered: the versions above are transaction IDs, which
    -- mean something on this server only (a promoted standby or a restored
    -- copy may have given the same ID to another write). Its start time tells
    -- servers apart, and the commit checks it.
    (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8 AS server
