-- Runs once, when the compose volume is new, as the image's POSTGRES_USER (the
-- schema owner). The runtime role gets row rights from `profile-worker migrate`
-- (DATABASE_RUNTIME_ROLE), never DDL.
CREATE ROLE profile_worker LOGIN NOCREATEDB NOCREATEROLE PASSWORD 'profile_worker';
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
