//! profile-worker: Crafter Profile's `create-ticket` and `create-verification-token`
//! as RabbitMQ commands, persisted in PostgreSQL. See README.md, docs/ARCHITECTURE.md
//! and docs/CONTRACT.md (cited as `CONTRACT §n` throughout).
//!
//! One batch, left to right: `worker::gather` takes deliveries from the
//! interactive and bulk queues (`worker::lanes` decides whose turn it is) →
//! `contract::decode` → `pipeline::basis` decides on rows an earlier batch read
//! (`Basis::Known`) or loads them (`Basis::Loaded`) → `pipeline::plan` (pure) →
//! one commit that also writes the replies and the outbox → `render` the replies
//! and events (pure) → publish, confirmed → ack. `pipeline::outbox` deletes the
//! confirmed events' rows and relays any left behind.
//!
//! The pipeline reaches the broker, the store, the clock and the ID source only
//! through `pipeline::ports`; `worker::adapters` implements them over lapin and
//! `store` (tokio-postgres), and `tests/simulation` over an in-memory broker
//! and store driven by one seeded scheduler. `worker` supervises sessions,
//! reconnects and shutdown. `records`, `contract`, `plan`, `render` and
//! `domain` name only each other and data crates (serde, schemars, uuid, sha2,
//! strum): no I/O, which `tests/integration/architecture.rs` checks.

pub mod backoff;
pub mod broker;
pub mod client;
pub mod config;
pub mod contract;
pub mod domain;
pub mod ops;
pub mod pipeline;
pub mod records;
pub mod render;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod worker;
