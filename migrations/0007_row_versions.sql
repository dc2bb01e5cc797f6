-- A batch may be decided on tokens and profiles an earlier batch read
-- (src/pipeline/known.rs), so its commit checks that each row is still the
-- version it was decided on: the row's xmin, the transaction that last wrote
-- it (any UPDATE writes a new row version with a new xmin; a DELETE leaves no
-- row). A worker keeps a version at most a minute, so xmin's wrap-around
-- (2^32 transactions) cannot make an old version look current.
--
-- New types rather than new attributes on migration 6's: a worker of the
-- previous release still reads those while the new one rolls out. Migration 6's
-- profile_worker_loaded_token and _profile are unused from this release on and
-- can go in a later migration.

-- LOAD's tokens and profiles, with their versions. A profile's tenant row may
-- be missing (tenant_xmin NULL): any link host is then allowed, so a tenant row
-- written later changes the decision too.
CREATE TYPE profile_worker_known_token AS (
    id_sha256          bytea,
    application        text,
    expires_ms         int8,
    tenant_permissions jsonb,
    xmin               int8
);
CREATE TYPE profile_worker_known_profile AS (
    id          text,
    tenant      text,
    email       text,
    enabled     bool,
    link_hosts  text[],
    xmin        int8,
    tenant_xmin int8
);

-- COMMIT's checks: the versions the batch was decided on.
CREATE TYPE profile_worker_token_version AS (
    id_sha256 bytea,
    xmin      int8
);
CREATE TYPE profile_worker_profile_version AS (
    id          text,
    xmin        int8,
    tenant      text,
    tenant_xmin int8
);

-- Raised inside a batch's commit when a row it was decided on changed since it
-- was read (a token revoked, a profile disabled, a tenant's link hosts
-- changed). A code of its own (PostgreSQL uses no class PW), so the
-- worker tells it from an outage: it forgets what it knew of the batch's rows
-- and decides the batch again on freshly loaded ones, at once.
CREATE FUNCTION profile_worker_rows_changed() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a token, profile or tenant this batch was decided on changed since it was read'
        USING ERRCODE = 'PW001';
END $$;
