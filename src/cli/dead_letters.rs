//! `profile-worker dead-letters list|replay`: look at what was dead-lettered and
//! why, and, after a fix, send chosen ones back to the command exchange.
//!
//! Both read the dead-letter queue with `basic.get` and no auto-ack. Listing
//! acks nothing, so every message returns to the queue when the channel closes;
//! replay acks a dead letter only after the broker confirmed its re-publication,
//! so an interrupted replay loses nothing (at worst a command is sent twice, and
//! its message_id makes the second one answer with the stored reply).

use anyhow::Context;
use clap::{Args, Subcommand};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use profile_worker::broker::properties;
use profile_worker::config::BrokerSettings;
use serde::Serialize;

#[derive(Subcommand)]
pub enum DeadLetterCmd {
    /// Show dead letters with the reason they were dead-lettered (the queue is left as it was).
    List {
        #[command(flatten)]
        scan: Scan,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Show bodies' accessTokenId whole (bearer secrets: masked by default).
        #[arg(long)]
        show_secrets: bool,
    },
    /// Re-publish chosen dead letters to the command exchange, then remove them from
    /// the dead-letter queue.
    Replay {
        #[command(flatten)]
        scan: Scan,
        #[command(flatten)]
        select: Selection,
        /// Show what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
pub struct Scan {
    /// Look at no more than this many dead letters (from the head of the queue).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,
    #[command(flatten)]
    pub broker: BrokerSettings,
}

/// Which dead letters to replay: by message_id, by error code, or all of them.
#[derive(Args, Debug, Default, Clone)]
#[group(required = true, multiple = true)]
pub struct Selection {
    /// A command's message_id (repeat for several).
    #[arg(long = "message-id")]
    pub message_ids: Vec<String>,
    /// Every dead letter with this error code (e.g. INTERNAL_SERVER_ERROR).
    #[arg(long)]
    pub code: Option<String>,
    /// Every dead letter looked at.
    #[arg(long)]
    pub all: bool,
}

impl Selection {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.all
            || d.message_id
                .as_ref()
                .is_some_and(|m| self.message_ids.contains(m))
            || self.code.as_ref().is_some_and(|c| *c == d.code)
    }
}

/// One dead letter as an operator sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Position in the queue, from 1.
    pub position: u64,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub command: String,
    /// The worker's error code, or the broker's dead-letter reason (e.g.
    /// `delivery_limit`) for one the broker dead-lettered itself.
    pub code: String,
    pub reason: String,
    pub body: String,
}

const WORKER_HEADERS: [&str; 2] = [
    properties::ERROR_CODE_HEADER,
    properties::ERROR_REASON_HEADER,
];
/// Headers the broker adds when it dead-letters or redelivers.
const BROKER_HEADERS: [&str; 10] = [
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
    "x-delivery-limit",
    "x-opt-deaths",
];

/// A body with its `accessTokenId` cut to a prefix (a bearer secret; enough
/// to tell tokens apart). A body that is not a JSON object is kept as it is.
pub fn mask_secrets(body: &str) -> String {
    let Ok(serde_json::Value::Object(mut o)) = serde_json::from_str::<serde_json::Value>(body)
    else {
        return body.to_string();
    };
    match o.get("accessTokenId") {
        Some(serde_json::Value::String(t)) => {
            let masked = format!("{} (masked)", profile_worker::telemetry::token_prefix(t));
            o.insert("accessTokenId".into(), masked.into());
            serde_json::Value::Object(o).to_string()
        }
        _ => body.to_string(),
    }
}

impl DeadLetter {
    pub fn read(position: u64, routing_key: &str, p: &BasicProperties, body: &[u8]) -> Self {
        let text = |name| properties::header_text(p, name).map(str::to_string);
        let (code, reason) = match text(properties::ERROR_CODE_HEADER) {
            Some(code) => (
                code,
                text(properties::ERROR_REASON_HEADER).unwrap_or_default(),
            ),
            // Dead-lettered by the broker (delivery limit, expiry, rejection).
            None => match text("x-first-death-reason").or_else(|| text("x-last-death-reason")) {
                Some(r) => (
                    r.clone(),
                    format!("dead-lettered by the broker ({r}) before the worker could answer"),
                ),
                None => ("unknown".into(), "no reason recorded".into()),
            },
        };
        DeadLetter {
            position,
            message_id: properties::short(p.message_id()).map(str::to_string),
            correlation_id: properties::short(p.correlation_id()).map(str::to_string),
            command: properties::short(p.kind())
                .unwrap_or(routing_key)
                .to_string(),
            code,
            reason,
            body: String::from_utf8_lossy(body).into_owned(),
        }
    }
}

/// The command as its publisher sent it: the dead-letter headers the worker
/// and the broker added are removed, everything else is kept (message_id,
/// correlation_id, reply_to, traceparent).
pub fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            if !WORKER_HEADERS.contains(&k.as_str()) && !BROKER_HEADERS.contains(&k.as_str()) {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    p.clone().with_headers(kept)
}

pub async fn run(cmd: DeadLetterCmd) -> anyhow::Result<()> {
    match cmd {
        DeadLetterCmd::List {
            scan,
            json,
            show_secrets,
        } => {
            let conn = super::connect(&scan.broker).await?;
            let channel = conn.create_channel().await?;
            let mut shown = 0;
            for_each(&channel, &scan, |d, _| {
                shown += 1;
                if json {
                    let mut d = d.clone();
                    if !show_secrets {
                        d.body = mask_secrets(&d.body);
                    }
                    println!("{}", serde_json::to_string(&d).unwrap_or_default());
                } else {
                    println!(
                        "{:>5}  {}  {}  {}: {}",
                        d.position,
                        d.message_id.as_deref().unwrap_or("-"),
                        d.command,
                        d.code,
                        d.reason
                    );
                }
            })
            .await?;
            // Nothing was acked: closing the channel returns every message.
            let _ = channel.close(200, "listed".into()).await;
            let _ = conn.close(200, "bye".into()).await;
            if !json {
                eprintln!(
                    "{shown} dead letter(s) in {}",
                    scan.broker.dead_letter_queue
                );
            }
            Ok(())
        }
        DeadLetterCmd::Replay {
            scan,
            select,
            dry_run,
        } => {
            let conn = super::connect(&scan.broker).await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let exchange = scan.broker.command_exchange.clone();
            let mut chosen = Vec::new();
            for_each(&channel, &scan, |d, m| {
                if select.matches(d) {
                    chosen.push((d.clone(), m));
                }
            })
            .await?;
            let mut replayed = 0;
            for (d, m) in &chosen {
                let what = format!(
                    "{} {} ({})",
                    d.message_id.as_deref().unwrap_or("-"),
                    d.command,
                    d.code
                );
                if dry_run {
                    println!("would replay {what}");
                    continue;
                }
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        m.delivery.routing_key.clone(),
                        BasicPublishOptions::default(),
                        &m.delivery.data,
                        replay_properties(&m.delivery.properties),
                    )
                    .await?
                    .await?;
                if !confirm.is_ack() {
                    anyhow::bail!(
                        "the broker refused to take {what} back; it stays dead-lettered ({replayed} replayed before it)"
                    );
                }
                channel
                    .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
                replayed += 1;
                println!("replayed {what}");
            }
            let _ = channel.close(200, "replayed".into()).await;
            let _ = conn.close(200, "bye".into()).await;
            eprintln!(
                "{} {} of the dead letters looked at to {exchange}",
                if dry_run { "would replay" } else { "replayed" },
                if dry_run { chosen.len() } else { replayed },
            );
            Ok(())
        }
    }
}

/// Gets dead letters one by one (each stays unacked on `channel`) up to the
/// limit or the end of the queue, and shows each to `f`.
async fn for_each(
    channel: &lapin::Channel,
    scan: &Scan,
    mut f: impl FnMut(&DeadLetter, lapin::message::BasicGetMessage),
) -> anyhow::Result<()> {
    let queue = scan.broker.dead_letter_queue.as_str();
    for position in 1..=scan.limit {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .context(queue.to_string())?;
        let Some(m) = got else { break };
        let d = DeadLetter::read(
            position,
            m.delivery.routing_key.as_str(),
            &m.delivery.properties,
            &m.delivery.data,
        );
        f(&d, m);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, LongString};

    #[test]
    fn bodies_are_shown_with_access_tokens_masked() {
        let body = r#"{"accessTokenId":"e8f5170c-877b-416f-b70f-4b09772f8e2d","profileId":"p"}"#;
        let masked = mask_secrets(body);
        assert!(!masked.contains("877b-416f"), "{masked}");
        assert!(masked.contains("e8f5170c… (masked)") && masked.contains("\"profileId\":\"p\""));
        assert_eq!(mask_secrets("not json"), "not json");
        assert_eq!(
            mask_secrets(r#"{"accessTokenId":5}"#),
            r#"{"accessTokenId":5}"#
        );
    }

    fn with_headers(pairs: &[(&str, &str)]) -> BasicProperties {
        let mut h = FieldTable::default();
        for (k, v) in pairs {
            h.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
        }
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("create-ticket".into())
            .with_headers(h)
    }

    #[test]
    fn reads_the_workers_reason_or_the_brokers() {
        let p = with_headers(&[
            ("x-error-code", "PARAM_DESERIALIZATION_ERROR"),
            ("x-error-reason", "body is not JSON"),
        ]);
        let d = DeadLetter::read(3, "create-ticket", &p, b"{x");
        assert_eq!(d.position, 3);
        assert_eq!(d.message_id.as_deref(), Some("m-1"));
        assert_eq!(d.code, "PARAM_DESERIALIZATION_ERROR");
        assert_eq!(d.reason, "body is not JSON");
        assert_eq!(d.body, "{x");

        let p = with_headers(&[("x-first-death-reason", "delivery_limit")]);
        let d = DeadLetter::read(1, "create-ticket", &p, b"{}");
        assert_eq!(d.code, "delivery_limit");
        assert!(d.reason.contains("broker"));

        let d = DeadLetter::read(1, "create-ticket", &BasicProperties::default(), b"");
        assert_eq!(
            (d.code.as_str(), d.command.as_str()),
            ("unknown", "create-ticket")
        );
    }

    #[test]
    fn replay_strips_dead_letter_headers_and_keeps_the_rest() {
        let p = with_headers(&[
            ("x-error-code", "INTERNAL_SERVER_ERROR"),
            ("x-error-reason", "failed"),
            ("x-delivery-count", "4"),
            ("x-first-death-reason", "delivery_limit"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ])
        .with_reply_to("replies".into());
        let r = replay_properties(&p);
        let keys: Vec<String> = r
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["traceparent"]);
        assert_eq!(r.message_id(), p.message_id());
        assert_eq!(r.reply_to(), p.reply_to());
        assert_eq!(r.kind(), p.kind());
    }

    #[test]
    fn selection_by_id_code_or_all() {
        let d = DeadLetter::read(
            1,
            "create-ticket",
            &with_headers(&[("x-error-code", "INTERNAL_SERVER_ERROR")]),
            b"",
        );
        let by = |s: Selection| s.matches(&d);
        assert!(by(Selection {
            message_ids: vec!["m-1".into()],
            ..Default::default()
        }));
        assert!(!by(Selection {
            message_ids: vec!["m-2".into()],
            ..Default::default()
        }));
        assert!(by(Selection {
            code: Some("INTERNAL_SERVER_ERROR".into()),
            ..Default::default()
        }));
        assert!(!by(Selection {
            code: Some("UNKNOWN_COMMAND".into()),
            ..Default::default()
        }));
        assert!(by(Selection {
            all: true,
            ..Default::default()
        }));
    }
}
