//! CONTRACT §1, declared idempotently at every (re)connect. A declaration that
//! conflicts with an existing object is a fatal, clearly worded error.
//!
//! The email exchange and its dispatch queue are declared here, not by the
//! dispatcher: a request published before its queue existed would be dropped
//! as unroutable, and the dispatcher's broker user has no right to declare.

use crate::config::BrokerSettings;
use crate::contract::CommandName;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("broker topology conflicts with an existing declaration: {0}. Delete or rename the object (or configure other names) and start again")]
    Conflict(String),
    #[error("the broker user may not declare the topology: {0}. Give it configure, write and read permissions on the worker's exchanges and queues (docs/OPERATIONS.md, \"Security\")")]
    Forbidden(String),
    #[error("declaring the broker topology failed")]
    Broker(#[from] lapin::Error),
}

impl TopologyError {
    /// Not worth retrying: only an operator can change it.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            TopologyError::Conflict(_) | TopologyError::Forbidden(_)
        )
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub fn command_queue_arguments(s: &BrokerSettings) -> FieldTable {
    lane_queue_arguments(s, s.command_queue_max_length, s.command_queue_max_bytes)
}

/// The bulk lane's queue: the command queue's arguments (delivery limit,
/// dead-lettering into the same dead-letter queue, reject-publish) with
/// bounds of its own.
pub fn bulk_queue_arguments(s: &BrokerSettings) -> FieldTable {
    lane_queue_arguments(s, s.bulk_queue_max_length, s.bulk_queue_max_bytes)
}

fn lane_queue_arguments(s: &BrokerSettings, max_length: u64, max_bytes: u64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(s.delivery_limit as i32),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&s.dead_letter_exchange),
    );
    // at-least-once dead-lettering needs reject-publish overflow.
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    limits(&mut args, max_length, max_bytes);
    args
}

/// The dead-letter queue: bounded, and refusing (not dropping) past its bounds,
/// so the command queue's at-least-once dead-lettering keeps what does not fit.
pub fn dead_letter_queue_arguments(s: &BrokerSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-overflow".into(), text("reject-publish"));
    if s.dead_letter_delivery_limit > 0 {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(s.dead_letter_delivery_limit)),
        );
    }
    limits(
        &mut args,
        s.dead_letter_queue_max_length,
        s.dead_letter_queue_max_bytes,
    );
    args
}

/// The email dispatcher's queue: quorum (an email request survives a node's
/// loss), bounded like the command queue, refusing past its bounds so the
/// worker keeps what does not fit in its outbox.
pub fn email_queue_arguments(s: &BrokerSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-overflow".into(), text("reject-publish"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(s.email_delivery_limit.min(i32::MAX as u32) as i32),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&s.email_dead_letter_exchange()),
    );
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    limits(&mut args, s.email_queue_max_length, s.email_queue_max_bytes);
    args
}

/// The email requests given up on: quorum and unbounded in time, like the
/// command dead letters, and refusing past their bounds.
fn email_dead_letter_queue_arguments(s: &BrokerSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-overflow".into(), text("reject-publish"));
    limits(
        &mut args,
        s.dead_letter_queue_max_length,
        s.dead_letter_queue_max_bytes,
    );
    args
}

/// `x-max-length` / `x-max-length-bytes`, each only when set (0: no limit).
fn limits(args: &mut FieldTable, max_length: u64, max_bytes: u64) {
    for (name, value) in [
        ("x-max-length", max_length),
        ("x-max-length-bytes", max_bytes),
    ] {
        if value > 0 {
            args.insert(
                name.into(),
                AMQPValue::LongLongInt(value.min(i64::MAX as u64) as i64),
            );
        }
    }
}

pub async fn declare(channel: &Channel, s: &BrokerSettings) -> Result<(), TopologyError> {
    // Commands whose routing key names no command would be dropped by the direct
    // exchange; its alternate exchange routes them to the queue instead, so they get
    // an UNKNOWN_COMMAND reply and a dead letter rather than vanishing.
    let unrouted = s.unrouted_exchange();
    let bulk_unrouted = s.bulk_unrouted_exchange();
    let (email_dlx, email_dead) = (s.email_dead_letter_exchange(), s.email_dead_letter_queue());
    let alternate = |to: &str| {
        let mut args = FieldTable::default();
        args.insert("alternate-exchange".into(), text(to));
        args
    };
    let exchanges = [
        (
            unrouted.as_str(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        ),
        (
            s.command_exchange.as_str(),
            ExchangeKind::Direct,
            alternate(&unrouted),
        ),
        (
            bulk_unrouted.as_str(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        ),
        (
            s.bulk_exchange.as_str(),
            ExchangeKind::Direct,
            alternate(&bulk_unrouted),
        ),
        (
            s.dead_letter_exchange.as_str(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        ),
        (
            s.events_exchange.as_str(),
            ExchangeKind::Topic,
            FieldTable::default(),
        ),
        (
            s.email_exchange.as_str(),
            ExchangeKind::Direct,
            FieldTable::default(),
        ),
        (
            email_dlx.as_str(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        ),
    ];
    let queues = [
        (s.dead_letter_queue.as_str(), dead_letter_queue_arguments(s)),
        (s.command_queue.as_str(), command_queue_arguments(s)),
        (s.bulk_queue.as_str(), bulk_queue_arguments(s)),
        (email_dead.as_str(), email_dead_letter_queue_arguments(s)),
        (s.email_queue.as_str(), email_queue_arguments(s)),
    ];
    let mut bindings = vec![
        (
            s.dead_letter_queue.as_str(),
            s.dead_letter_exchange.as_str(),
            "",
        ),
        (s.command_queue.as_str(), unrouted.as_str(), ""),
        (s.bulk_queue.as_str(), bulk_unrouted.as_str(), ""),
        (
            s.email_queue.as_str(),
            s.email_exchange.as_str(),
            crate::contract::message::routing::EMAIL_REQUESTED,
        ),
        (email_dead.as_str(), email_dlx.as_str(), ""),
    ];
    for name in CommandName::ALL {
        for (queue, exchange) in [
            (&s.command_queue, &s.command_exchange),
            (&s.bulk_queue, &s.bulk_exchange),
        ] {
            bindings.push((queue.as_str(), exchange.as_str(), name.as_str()));
        }
    }
    let result: Result<(), lapin::Error> = async {
        for (name, kind, args) in exchanges {
            channel
                .exchange_declare(name.into(), kind, durable_exchange(), args)
                .await?;
        }
        for (name, args) in queues {
            channel
                .queue_declare(name.into(), durable_queue(), args)
                .await?;
        }
        for (queue, exchange, key) in bindings {
            channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
    .await;
    result.map_err(|e| match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) =>
        {
            TopologyError::Conflict(amqp.get_message().as_str().to_string())
        }
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            ) =>
        {
            TopologyError::Forbidden(amqp.get_message().as_str().to_string())
        }
        _ => TopologyError::Broker(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BrokerSettings {
        crate::config::Settings::from_env().broker
    }

    #[test]
    fn the_dead_letter_queue_declares_its_delivery_limit_unless_told_not_to() {
        let mut s = settings();
        let args = dead_letter_queue_arguments(&s);
        assert_eq!(
            args.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(1_000))
        );
        s.dead_letter_delivery_limit = 0;
        assert!(dead_letter_queue_arguments(&s)
            .inner()
            .get("x-delivery-limit")
            .is_none());
    }
}
