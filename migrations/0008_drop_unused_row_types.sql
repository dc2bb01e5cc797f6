-- Migration 6's profile_worker_loaded_token and _loaded_profile: unused since
-- migration 7 (load.sql reads profile_worker_known_token and _known_profile),
-- kept one release so workers of the release before could roll out. Upgrading
-- from a build older than migration 7, stop its workers before migrating.
DROP TYPE IF EXISTS profile_worker_loaded_token;
DROP TYPE IF EXISTS profile_worker_loaded_profile;
