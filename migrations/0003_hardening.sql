-- Hardening (CONTRACT §2-§8): secrets at rest, tenant link hosts, caller-bound
-- idempotency records and the email cooldown.

-- §7: an access token is kept as the SHA-256 of its ID, never the ID itself. A
-- reader looks one up by hashing what it was given:
--   SELECT * FROM access_tokens WHERE id_sha256 = sha256(convert_to($1, 'UTF8'));
ALTER TABLE access_tokens ADD COLUMN id_sha256 bytea;
UPDATE access_tokens SET id_sha256 = sha256(convert_to(id, 'UTF8'));
ALTER TABLE access_tokens DROP COLUMN id;
ALTER TABLE access_tokens ALTER COLUMN id_sha256 SET NOT NULL;
ALTER TABLE access_tokens ADD CONSTRAINT access_tokens_pkey PRIMARY KEY (id_sha256);
ALTER TABLE access_tokens ADD CONSTRAINT access_tokens_id_sha256_length
    CHECK (length(id_sha256) = 32);

-- §8: hosts a caller-given verificationUrl may point at; empty: any host.
ALTER TABLE tenants ADD COLUMN link_hosts text[] NOT NULL DEFAULT '{}';

-- §4: a stored reply goes only to a repeat of the same command: SHA-256 over the
-- command type and its decoded body (access token ID included). Records written
-- before this migration have none and so match no repeat (409).
ALTER TABLE processed_commands ADD COLUMN fingerprint bytea;
-- Rejections for an unknown or expired token are no longer remembered, and their
-- messages carry the whole access token ID.
DELETE FROM processed_commands
 WHERE reply LIKE '{"errorCode":"NO_SUCH_ACCESS_TOKEN_ID"%'
    OR reply LIKE '{"errorCode":"ACCESS_DENIED"%';

-- §3 rule 6: when the last verification email for a profile and purpose was asked for.
CREATE TABLE email_cooldowns (
    profile_id   text NOT NULL,
    purpose      text NOT NULL,
    requested_at timestamptz NOT NULL,
    PRIMARY KEY (profile_id, purpose)
);
CREATE INDEX email_cooldowns_requested_at ON email_cooldowns (requested_at);

-- Raised inside a batch's commit when another transaction claimed an email
-- cooldown first: serialization_failure, so the batch is retried and decided
-- again against the committed claim.
CREATE FUNCTION profile_worker_cooldown_taken() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'another transaction requested an email for the same profile and purpose first'
        USING ERRCODE = '40001';
END $$;
