//! Where a run's broker objects live: a vhost of its own, or (where
//! `rabbitmqctl` cannot reach the broker) names with a prefix of its own; and
//! removing them afterwards.

use crate::error::{BenchError, Result};
use crate::setup;
use profile_worker::broker;
use profile_worker::config::{BrokerAddress, BrokerSettings};

#[derive(Clone)]
pub enum Isolation {
    Vhost(String),
    Prefix(String),
}

impl Isolation {
    pub fn describe(&self) -> String {
        match self {
            Isolation::Vhost(v) => format!("vhost {v}"),
            Isolation::Prefix(p) => format!("broker objects named {p}*"),
        }
    }

    pub fn amqp_url(&self, base: &str) -> Result<String> {
        match self {
            Isolation::Vhost(v) => setup::with_vhost(base, v),
            Isolation::Prefix(_) => Ok(base.to_string()),
        }
    }

    pub fn prefix(&self) -> &str {
        match self {
            Isolation::Vhost(_) => "",
            Isolation::Prefix(p) => p,
        }
    }

    pub async fn remove(&self, amqp_url: &str) -> Result<()> {
        match self {
            Isolation::Vhost(v) => setup::delete_vhost(v).await,
            Isolation::Prefix(p) => remove_prefixed(amqp_url, p).await,
        }
    }
}

/// The worker's broker names under `prefix`, with its defaults.
pub fn names(prefix: &str, amqp_url: &str, prefetch: u16, bulk_prefetch: u16) -> BrokerSettings {
    BrokerSettings {
        address: BrokerAddress {
            amqp_url: amqp_url.into(),
            amqp_ca_file: None,
        },
        command_exchange: format!("{prefix}profile.commands"),
        command_queue: format!("{prefix}profile.commands"),
        bulk_exchange: format!("{prefix}profile.commands.bulk"),
        bulk_queue: format!("{prefix}profile.commands.bulk"),
        bulk_queue_max_length: 1_000_000,
        bulk_queue_max_bytes: 1 << 30,
        bulk_prefetch,
        dead_letter_exchange: format!("{prefix}profile.commands.dlx"),
        dead_letter_queue: format!("{prefix}profile.commands.dead"),
        events_exchange: format!("{prefix}profile.events"),
        email_exchange: format!("{prefix}profile.email"),
        email_queue: format!("{prefix}profile.email.dispatch"),
        email_queue_max_length: 1_000_000,
        email_queue_max_bytes: 1 << 30,
        email_delivery_limit: 20,
        delivery_limit: 5,
        prefetch,
        heartbeat_secs: 10,
        reply_to_prefixes: vec!["amq.gen-".into()],
        command_queue_max_length: 1_000_000,
        command_queue_max_bytes: 1 << 30,
        dead_letter_queue_max_length: 100_000,
        dead_letter_queue_max_bytes: 256 << 20,
        dead_letter_delivery_limit: 1_000,
    }
}

pub fn ceiling_queue(prefix: &str) -> String {
    format!("{prefix}bench.ceiling")
}

pub fn events_ceiling_queue(prefix: &str) -> String {
    format!("{prefix}bench.events-ceiling")
}

pub fn ceiling_events_exchange(prefix: &str) -> String {
    format!("{prefix}bench.ceiling-events")
}

/// An audit service's queue: classic, durable, bound to `ticket.created`.
pub fn audit_queue(prefix: &str) -> String {
    format!("{prefix}bench.audit")
}

/// The events echo's audit queue, bound to its own exchange.
pub fn ceiling_audit_queue(prefix: &str) -> String {
    format!("{prefix}bench.ceiling-audit")
}

pub fn ceiling_email_queue(prefix: &str) -> String {
    format!("{prefix}bench.ceiling-email-dispatch")
}

async fn remove_prefixed(amqp_url: &str, prefix: &str) -> Result<()> {
    let n = names(prefix, amqp_url, 1, 1);
    n.validate().map_err(|e| BenchError::Usage(e.to_string()))?;
    let uri = broker::nodes(&n.address, n.heartbeat_secs)
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let conn = broker::connect(uri.first(), &Default::default())
        .await
        .map_err(|e| BenchError::broker("AMQP_URL", e))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| BenchError::broker("AMQP_URL", e))?;
    for q in [
        n.command_queue.clone(),
        n.bulk_queue.clone(),
        n.dead_letter_queue.clone(),
        n.email_queue.clone(),
        n.email_dead_letter_queue(),
        ceiling_queue(prefix),
        events_ceiling_queue(prefix),
        ceiling_email_queue(prefix),
        audit_queue(prefix),
        ceiling_audit_queue(prefix),
    ] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for x in [
        n.command_exchange.clone(),
        n.unrouted_exchange(),
        n.bulk_exchange.clone(),
        n.bulk_unrouted_exchange(),
        n.dead_letter_exchange.clone(),
        n.events_exchange.clone(),
        n.email_exchange.clone(),
        n.email_dead_letter_exchange(),
        ceiling_events_exchange(prefix),
    ] {
        let _ = ch
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}
