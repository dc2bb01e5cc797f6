//! `profile-worker dead-letters list|replay|purge`: look at what was
//! dead-lettered and why; after a fix, send chosen ones back to the command
//! exchange; delete chosen ones for good. With `--queue email`, the same for
//! the email requests the dispatcher gave up on: a replay goes to the email
//! exchange, as the worker publishes them, so only the dispatcher reads it.
//!
//! All three make one pass over the queue ([`pass`]): every dead letter read is
//! settled by the tool, never returned to the queue, because a quorum queue
//! counts a returned message as a delivery, and a delivery limit (RabbitMQ 4.x:
//! 20 by default) would in the end drop dead letters that were only looked at.

use anyhow::Context;
use clap::{Args, Subcommand};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use profile_worker::broker::properties;
use profile_worker::config::DEFAULT_DEAD_LETTER_QUEUE;
use profile_worker::contract::Incoming;
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
    /// Re-publish chosen dead letters to the command exchange (with `--queue
    /// email`, the email exchange), then remove them from the dead-letter queue.
    Replay {
        #[command(flatten)]
        scan: Scan,
        #[command(flatten)]
        select: Selection,
        /// Show what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The worker's lane to replay commands into: bulk for many at once
        /// (an import's), so they do not hold up interactive callers.
        #[arg(long, value_enum, default_value_t = super::Lane::Interactive)]
        lane: super::Lane,
        /// `--queue email` only: give each replayed request a new ID, so a
        /// dispatcher that had claimed it (INTERRUPTED_WHILE_SENDING) sends it
        /// again. Only once the inbox shows it never arrived: it may arrive twice.
        #[arg(long)]
        as_new: bool,
    },
    /// Delete chosen dead letters for good (after a look with --dry-run).
    Purge {
        #[command(flatten)]
        scan: Scan,
        #[command(flatten)]
        select: Selection,
        /// Show what would be purged, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Really delete (required unless --dry-run).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
pub struct Scan {
    /// Look at no more than this many dead letters (from the head of the queue).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,
    /// Which dead letters: the worker's commands, or the email requests the
    /// dispatcher gave up on (`<EMAIL_QUEUE>.dead`).
    #[arg(long, value_enum, default_value_t = Queue::Commands)]
    pub queue: Queue,
    #[command(flatten)]
    pub broker: super::Commands,
    /// Queue holding the worker's dead letters.
    #[arg(long, env = "DEAD_LETTER_QUEUE", default_value = DEFAULT_DEAD_LETTER_QUEUE)]
    pub dead_letter_queue: String,
    /// The email dispatcher's queue (its dead letters are `<EMAIL_QUEUE>.dead`).
    #[arg(long, env = "EMAIL_QUEUE", default_value = "profile.email.dispatch")]
    pub email_queue: String,
    /// The exchange email requests are replayed to.
    #[arg(long, env = "EMAIL_EXCHANGE", default_value = "profile.email")]
    pub email_exchange: String,
}

/// The dead-letter queues the tool reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    Commands,
    Email,
}

impl Scan {
    /// The dead-letter queue this pass reads.
    fn queue_name(&self) -> String {
        match self.queue {
            Queue::Commands => self.dead_letter_queue.clone(),
            Queue::Email => format!("{}.dead", self.email_queue),
        }
    }
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

/// A body with its secrets cut: a command's `accessTokenId` to a prefix (a
/// bearer secret; enough to tell tokens apart), an email request's
/// `tokenId` likewise, its `verificationLink` to what comes before the token,
/// and its recipient to a first letter and a domain. A body that is not a
/// JSON object is kept as it is.
pub fn mask_secrets(body: &str) -> String {
    let Ok(serde_json::Value::Object(mut o)) = serde_json::from_str::<serde_json::Value>(body)
    else {
        return body.to_string();
    };
    let mut changed = false;
    for key in ["accessTokenId", "tokenId"] {
        if let Some(serde_json::Value::String(t)) = o.get(key) {
            let masked = format!("{} (masked)", profile_worker::telemetry::token_prefix(t));
            o.insert(key.into(), masked.into());
            changed = true;
        }
    }
    if let Some(serde_json::Value::String(link)) = o.get("verificationLink") {
        let base = link.split("tokenId=").next().unwrap_or_default();
        o.insert(
            "verificationLink".into(),
            format!("{base}tokenId=… (masked)").into(),
        );
        changed = true;
    }
    if let Some(serde_json::Value::String(to)) = o.get("to") {
        let masked = match to.split_once('@') {
            Some((local, domain)) => {
                format!("{}***@{domain}", local.chars().next().unwrap_or('*'))
            }
            None => "***".into(),
        };
        o.insert("to".into(), masked.into());
        changed = true;
    }
    if changed {
        serde_json::Value::Object(o).to_string()
    } else {
        body.to_string()
    }
}

/// An email request with a new ID (`--as-new`): its `message_id` and its
/// body's `id`, which are the same.
fn as_new(props: BasicProperties, body: &[u8]) -> (BasicProperties, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.insert("id".into(), id.clone().into());
            serde_json::Value::Object(o).to_string().into_bytes()
        }
        _ => body.to_vec(),
    };
    (props.with_message_id(id.as_str().into()), body)
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
            command: Incoming {
                kind: properties::short(p.kind()),
                routing_key,
                ..Incoming::default()
            }
            .kind()
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

/// The same message, to put back at the tail of the dead-letter queue: the
/// broker's running delivery count is dropped, so the copy starts afresh.
pub fn kept_properties(p: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            if k.as_str() != "x-delivery-count" {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    p.clone().with_headers(kept)
}

/// What becomes of one dead letter in a pass over the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stays: put back as a fresh copy.
    Keep,
    /// Back to the command exchange.
    Replay,
    /// Gone.
    Remove,
}

/// How many dead letters a pass looked at and what it did with them.
#[derive(Debug, Default)]
struct Tally {
    looked_at: u64,
    kept: u64,
    replayed: u64,
    removed: u64,
}

pub async fn run(cmd: DeadLetterCmd) -> anyhow::Result<()> {
    match cmd {
        DeadLetterCmd::List {
            scan,
            json,
            show_secrets,
        } => {
            let tally = pass(&scan, Replay::NOWHERE, |d| {
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
                Action::Keep
            })
            .await?;
            if !json {
                eprintln!(
                    "{} dead letter(s) in {}",
                    tally.looked_at,
                    scan.queue_name()
                );
            }
            Ok(())
        }
        DeadLetterCmd::Replay {
            scan,
            select,
            dry_run,
            lane,
            as_new,
        } => {
            if as_new && scan.queue != Queue::Email {
                anyhow::bail!("--as-new is for email requests (--queue email) only");
            }
            let exchange = match scan.queue {
                Queue::Commands => scan.broker.exchange(lane).to_string(),
                Queue::Email => scan.email_exchange.clone(),
            };
            let mut chosen = 0u64;
            let replay = Replay {
                to: &exchange,
                routing_key: match scan.queue {
                    Queue::Commands => None,
                    Queue::Email => {
                        Some(profile_worker::contract::message::routing::EMAIL_REQUESTED)
                    }
                },
                as_new,
            };
            let tally = pass(&scan, replay, |d| {
                if !select.matches(d) {
                    return Action::Keep;
                }
                chosen += 1;
                let what = describe(d);
                if dry_run {
                    println!("would replay {what}");
                    Action::Keep
                } else {
                    println!("replaying {what}");
                    Action::Replay
                }
            })
            .await?;
            eprintln!(
                "{} {} of the {} dead letters looked at to {exchange}",
                if dry_run { "would replay" } else { "replayed" },
                if dry_run { chosen } else { tally.replayed },
                tally.looked_at,
            );
            Ok(())
        }
        DeadLetterCmd::Purge {
            scan,
            select,
            dry_run,
            yes,
        } => {
            if !dry_run && !yes {
                anyhow::bail!(
                    "purge deletes dead letters for good: look first with --dry-run, then add --yes"
                );
            }
            let mut chosen = 0u64;
            let tally = pass(&scan, Replay::NOWHERE, |d| {
                if !select.matches(d) {
                    return Action::Keep;
                }
                chosen += 1;
                if dry_run {
                    println!("would purge {}", describe(d));
                    Action::Keep
                } else {
                    println!("purging {}", describe(d));
                    Action::Remove
                }
            })
            .await?;
            eprintln!(
                "{} {} of the {} dead letters looked at",
                if dry_run { "would purge" } else { "purged" },
                if dry_run { chosen } else { tally.removed },
                tally.looked_at,
            );
            Ok(())
        }
    }
}

fn describe(d: &DeadLetter) -> String {
    format!(
        "{} {} ({})",
        d.message_id.as_deref().unwrap_or("-"),
        d.command,
        d.code
    )
}

/// One pass over the head of the dead-letter queue: at most `--limit` dead
/// letters, and never more than the queue held when the pass began (so the
/// copies it puts back are not read again). Each is read with `basic.get`,
/// shown to `decide`, and settled only after its outcome is safe: a kept one
/// is re-published to the tail of the queue (confirmed) before the original
/// is acked, a replayed one to the command exchange (confirmed) before the
/// original is acked. A read dead letter is never returned to the queue, which
/// would count a delivery against it (and RabbitMQ 4.x drops a quorum queue's
/// message at 20 by default). An interrupted pass loses nothing; at worst a
/// dead letter is there twice, or a command is replayed twice, which its
/// message_id makes harmless.
/// Where a pass replays to, and whether with new IDs.
#[derive(Clone, Copy)]
struct Replay<'a> {
    to: &'a str,
    /// The routing key replays carry; `None` keeps the dead letter's own.
    /// An email request's dead letter carries the dispatcher's dead-letter
    /// key, which routes nowhere on the email exchange, so it gets the
    /// contract's `email.requested` back.
    routing_key: Option<&'a str>,
    as_new: bool,
}

impl Replay<'_> {
    /// For the passes that replay nothing.
    const NOWHERE: Replay<'static> = Replay {
        to: "",
        routing_key: None,
        as_new: false,
    };
}

/// Reads every dead letter of the queue once, doing what `decide` says:
/// keeping it, replaying it as `replay` says, or removing it.
async fn pass(
    scan: &Scan,
    replay: Replay<'_>,
    mut decide: impl FnMut(&DeadLetter) -> Action,
) -> anyhow::Result<Tally> {
    let conn = super::connect(&scan.broker.address).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue_name = scan.queue_name();
    let queue = queue_name.as_str();
    let depth = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("{queue}: no such queue (has the worker run?)"))?
        .message_count();
    let mut tally = Tally::default();
    for position in 1..=scan.limit.min(u64::from(depth)) {
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
        tally.looked_at += 1;
        let action = decide(&d);
        let mut body = std::borrow::Cow::Borrowed(m.delivery.data.as_slice());
        let (exchange, routing_key, props) = match action {
            Action::Keep => ("", queue.into(), kept_properties(&m.delivery.properties)),
            Action::Replay => {
                let mut props = replay_properties(&m.delivery.properties);
                if replay.as_new {
                    let (p, b) = as_new(props, &m.delivery.data);
                    props = p;
                    body = std::borrow::Cow::Owned(b);
                }
                let key = replay
                    .routing_key
                    .map_or_else(|| m.delivery.routing_key.clone(), Into::into);
                (replay.to, key, props)
            }
            Action::Remove => {
                channel
                    .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
                tally.removed += 1;
                continue;
            }
        };
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                props,
            )
            .await?
            .await?;
        if !confirm.is_ack() || confirm.take_message().is_some() {
            anyhow::bail!(
                "the broker did not take {} {}; it stays dead-lettered ({} looked at before it)",
                describe(&d),
                if action == Action::Keep {
                    "back (is the dead-letter queue full?)"
                } else {
                    "where it is replayed to"
                },
                tally.looked_at - 1
            );
        }
        channel
            .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        match action {
            Action::Keep => tally.kept += 1,
            _ => tally.replayed += 1,
        }
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(tally)
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
