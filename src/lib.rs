//! profile-worker: Crafter Profile's `create-ticket` and `create-verification-token`
//! as RabbitMQ commands, persisted in PostgreSQL. See README.md, docs/ARCHITECTURE.md
//! and docs/CONTRACT.md (cited as `CONTRACT §n` throughout).
//!
//! The flow of one batch: `broker` (consume) → `contract::decode` → `store::load` →
//! `domain::decide` (pure) → `store::commit` (one transaction) → `broker` (publish,
//! confirmed) → ack. `pipeline` runs it; `worker` supervises it.

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
