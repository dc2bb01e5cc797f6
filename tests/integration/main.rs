//! The integration tests, one binary: each test gets its own database and its
//! own prefixed broker names (profile-worker-testkit), so they run in parallel.
//! The fault tests, which stop and restart the servers, are a binary of their
//! own (tests/faults.rs). `TEST_LOG=1` shows the workers' logs.

mod access_tokens;
mod architecture;
mod bad_input;
mod commands;
mod commit;
mod contract;
mod dead_letters;
mod dispatcher;
mod examples;
mod harness;
mod hostile;
mod known_rows;
mod maintenance;
mod migrations;
mod ops;
mod otlp;
mod packaging;
mod process;
mod prometheus;
mod provision;
mod safe_defaults;
mod schemas;
mod security;
mod transport;
mod trust;
