//! `profile-worker provision`: batch provisioning from a file. Every line becomes
//! a command with a `message_id` derived from the file's content and the line, so
//! an interrupted run can simply be run again: what was done is answered from the
//! worker's idempotency records, nothing is created twice.

use anyhow::Context;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicPublishOptions;
use profile_worker::broker::properties;
use profile_worker::contract::CommandName;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(clap::Args, Debug, Clone)]
pub struct ProvisionArgs {
    /// Input: one JSON command per line ({"type": …, "accessTokenId": …, …}), or one
    /// profile ID per line with --type. `-` reads standard input.
    pub input: PathBuf,
    /// Every line is a profile ID and this is the command to send for it.
    #[arg(long = "type", value_parser = clap::builder::PossibleValuesParser::new(CommandName::names()))]
    pub kind: Option<String>,
    /// Access token for lines that carry none (never printed).
    #[arg(long, env = "PROVISION_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: Option<String>,
    /// Where to write one result line per input line (NDJSON); standard output by default.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Most commands awaiting their reply at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub in_flight: u64,
    /// Give up when no reply arrives for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// The worker's lane to publish into: bulk (the default) is taken only as
    /// far as interactive commands leave room, so a provisioning run never
    /// holds up a login.
    #[arg(long, value_enum, default_value_t = super::Lane::Bulk)]
    pub lane: super::Lane,
    #[command(flatten)]
    pub broker: super::Commands,
}

/// One input line made ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyLine {
    pub command: CommandName,
    pub message_id: String,
    pub body: String,
}

/// Why a line is not sent.
pub type LineError = String;

/// The run's identity: the same bytes give the same message_ids.
pub fn file_namespace(content: &str) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x7c1f_3a52_9d1e_4b7a_8f0e_2d6c_5b4a_3921);
    Uuid::new_v5(&NAMESPACE, content.as_bytes())
}

/// Turns input line `number` (1-based) into a command. Pure.
pub fn prepare_line(
    number: usize,
    line: &str,
    namespace: &Uuid,
    kind: Option<&str>,
    access_token: Option<&str>,
) -> Result<Option<ReadyLine>, LineError> {
    let text = line.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let derived = Uuid::new_v5(namespace, format!("{number}:{text}").as_bytes()).to_string();
    let (command, mut fields, message_id) = if let Some(kind) =
        kind.filter(|_| !text.starts_with('{'))
    {
        let command = CommandName::parse(kind).ok_or_else(|| format!("unknown --type {kind}"))?;
        let mut m = Map::new();
        m.insert(
            command.profile_field().into(),
            Value::String(text.to_string()),
        );
        (command, m, derived)
    } else {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
        let Value::Object(mut m) = value else {
            return Err("not a JSON object".into());
        };
        let kind_field = m.remove("type");
        let kind = match (&kind_field, kind) {
            (Some(Value::String(k)), _) => k.clone(),
            (None, Some(k)) => k.to_string(),
            (Some(_), _) => return Err("\"type\" must be a string".into()),
            (None, None) => return Err("no \"type\" (or give --type)".into()),
        };
        let command = CommandName::parse(&kind).ok_or_else(|| {
            format!(
                "unknown type \"{kind}\": expected one of {}",
                CommandName::names().collect::<Vec<_>>().join(", ")
            )
        })?;
        let message_id = match m.remove("messageId") {
            None => derived,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => s,
            Some(_) => return Err("\"messageId\" must be a string of 1 to 255 bytes".into()),
        };
        (command, m, message_id)
    };
    if !fields.contains_key("accessTokenId") {
        let token = access_token.ok_or(
            "no \"accessTokenId\" on the line and no --access-token / PROVISION_ACCESS_TOKEN",
        )?;
        fields.insert("accessTokenId".into(), Value::String(token.to_string()));
    }
    let body = Value::Object(fields).to_string();
    // Checked here with the worker's own decoder, so a bad line is reported with
    // its number instead of becoming a dead letter.
    profile_worker::contract::decode(profile_worker::contract::Incoming {
        kind: Some(command.as_str()),
        routing_key: command.as_str(),
        content_type: Some("application/json"),
        body: body.as_bytes(),
        ..Default::default()
    })
    .map_err(|r| r.message)?;
    Ok(Some(ReadyLine {
        command,
        message_id,
        body,
    }))
}

/// How a line ended.
#[derive(Debug, Clone)]
enum LineEnd {
    Invalid(String),
    Replied { status: i64, body: Value },
}

/// Counts by status and error code, for the closing summary. Pure.
pub fn summary(results: &[(i64, Option<String>)], invalid: usize) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for (status, code) in results {
        let key = match code {
            Some(c) => format!("{status} {c}"),
            None => status.to_string(),
        };
        *by.entry(key).or_default() += 1;
    }
    let mut parts: Vec<String> = by.into_iter().map(|(k, n)| format!("{k}: {n}")).collect();
    if invalid > 0 {
        parts.push(format!("invalid lines: {invalid}"));
    }
    format!(
        "{} lines: {}",
        results.len() + invalid,
        if parts.is_empty() {
            "nothing to do".into()
        } else {
            parts.join(", ")
        }
    )
}

/// Runs the file; Ok(true) when every line was answered 200.
pub async fn run(args: ProvisionArgs) -> anyhow::Result<bool> {
    let content = if args.input.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("stdin")?
    } else {
        std::fs::read_to_string(&args.input).with_context(|| args.input.display().to_string())?
    };
    let namespace = file_namespace(&content);
    let mut outcomes: Vec<(usize, Option<String>, LineEnd)> = Vec::new();
    let mut to_send: Vec<(usize, ReadyLine)> = Vec::new();
    for (i, line) in content.lines().enumerate() {
        match prepare_line(
            i + 1,
            line,
            &namespace,
            args.kind.as_deref(),
            args.access_token.as_deref(),
        ) {
            Ok(Some(p)) => to_send.push((i + 1, p)),
            Ok(None) => {}
            Err(e) => outcomes.push((i + 1, None, LineEnd::Invalid(e))),
        }
    }
    let replies = send_all(&args, &to_send).await?;
    for ((line, p), reply) in to_send.iter().zip(replies) {
        outcomes.push((*line, Some(p.message_id.clone()), reply));
    }
    outcomes.sort_by_key(|(line, _, _)| *line);

    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| path.display().to_string())?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut answered = Vec::new();
    let mut invalid = 0;
    for (line, message_id, outcome) in &outcomes {
        let record = match outcome {
            LineEnd::Invalid(e) => {
                invalid += 1;
                eprintln!("line {line}: {e}");
                json!({ "line": line, "status": "invalid", "error": e })
            }
            LineEnd::Replied { status, body } => {
                let code = body
                    .get("errorCode")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                answered.push((*status, code));
                json!({ "line": line, "messageId": message_id, "status": status, "reply": body })
            }
        };
        writeln!(out, "{record}").context("writing results")?;
    }
    out.flush().context("writing results")?;
    eprintln!("{}", summary(&answered, invalid));
    Ok(invalid == 0 && answered.iter().all(|(s, _)| *s == 200))
}

/// Publishes every command with confirms, at most `in_flight` unanswered, and
/// returns the replies in the order of `commands`.
async fn send_all(
    args: &ProvisionArgs,
    commands: &[(usize, ReadyLine)],
) -> anyhow::Result<Vec<LineEnd>> {
    if commands.is_empty() {
        return Ok(vec![]);
    }
    let conn = super::connect(&args.broker.address).await?;
    let (channel, mut replies) = profile_worker::client::reply_channel(&conn).await?;

    let n = commands.len();
    let mut results: Vec<Option<LineEnd>> = vec![None; n];
    let (mut next, mut answered, mut outstanding) = (0usize, 0usize, 0usize);
    let mut confirms = FuturesUnordered::new();
    let window = args.in_flight as usize;
    let stall = Duration::from_secs(args.timeout.max(1));
    let mut progress = Progress::new(n);
    let mut last_reply = Instant::now();
    while answered < n {
        let mut batch = Vec::new();
        while outstanding < window && next < n {
            let (_, p) = &commands[next];
            let props = profile_worker::client::command_properties(
                p.command.as_str(),
                &p.message_id,
                &next.to_string(),
            );
            batch.push((p, props));
            next += 1;
            outstanding += 1;
        }
        // Started together: lapin resolves each publish only once written.
        let sent = futures_util::future::join_all(batch.into_iter().map(|(p, props)| {
            channel.basic_publish(
                args.broker.exchange(args.lane).into(),
                p.command.as_str().into(),
                BasicPublishOptions::default(),
                p.body.as_bytes(),
                props,
            )
        }))
        .await;
        for s in sent {
            confirms.push(s.context("publishing failed")?);
        }
        let mut take = |d: lapin::message::Delivery| {
            let index = d
                .properties
                .correlation_id()
                .as_ref()
                .and_then(|c| c.as_str().parse::<usize>().ok())
                .filter(|&i| i < n);
            if let Some(i) = index {
                if results[i].is_none() {
                    let status = properties::reply_status(&d.properties);
                    let body = serde_json::from_slice(&d.data).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&d.data).into_owned())
                    });
                    results[i] = Some(LineEnd::Replied { status, body });
                    answered += 1;
                    outstanding -= 1;
                }
            }
        };
        tokio::select! {
            reply = replies.next() => {
                let d = reply.context("the broker closed the reply consumer")??;
                take(d);
                while let Some(Some(Ok(d))) = replies.next().now_or_never() {
                    take(d);
                }
                last_reply = Instant::now();
                progress.update(answered);
            }
            Some(c) = confirms.next(), if !confirms.is_empty() => {
                if c?.is_nack() {
                    anyhow::bail!("the broker refused a command (nack); run the file again to finish it");
                }
            }
            _ = tokio::time::sleep_until((last_reply + stall).into()) => {
                anyhow::bail!(
                    "no reply for {} s ({answered} of {n} answered): is `profile-worker run` running? Run the file again to finish; what was done is not repeated",
                    stall.as_secs()
                );
            }
        }
    }
    progress.done(n);
    let _ = conn.close(200, "bye".into()).await;
    Ok(results
        .into_iter()
        .map(|r| r.expect("every command answered"))
        .collect())
}

/// A bar with rate and ETA on a terminal; a plain line every few seconds
/// otherwise (a log file or CI gets no control characters).
struct Progress {
    total: usize,
    started: Instant,
    last: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} answered, {rate}, ETA {eta}",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", s.per_sec());
                    },
                ));
            }
            bar
        });
        Progress {
            total,
            started: Instant::now(),
            last: Instant::now(),
            bar,
        }
    }

    fn update(&mut self, done: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            return;
        }
        if self.last.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-3);
        let eta = (self.total - done) as f64 / rate.max(1e-3);
        eprintln!(
            "{done}/{} answered, {rate:.0}/s, ETA {eta:.0} s",
            self.total
        );
    }

    fn done(&self, n: usize) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        eprintln!("{n} commands answered in {secs:.1} s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: Uuid = Uuid::from_u128(1);

    #[test]
    fn json_lines_keep_their_fields_and_take_the_token_when_missing() {
        let p = prepare_line(
            3,
            r#"{"type":"create-verification-token","id":"p1","purpose":"reset-password"}"#,
            &NS,
            None,
            Some("tok"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.command, CommandName::CreateVerificationToken);
        let body: Value = serde_json::from_str(&p.body).unwrap();
        assert_eq!(
            body,
            json!({"id": "p1", "purpose": "reset-password", "accessTokenId": "tok"})
        );
    }

    #[test]
    fn plain_ids_with_type() {
        let p = prepare_line(1, " p9 ", &NS, Some("create-ticket"), Some("tok"))
            .unwrap()
            .unwrap();
        assert_eq!(p.command, CommandName::CreateTicket);
        assert_eq!(
            serde_json::from_str::<Value>(&p.body).unwrap(),
            json!({"profileId": "p9", "accessTokenId": "tok"})
        );
    }

    #[test]
    fn message_ids_are_deterministic_per_file_and_line_or_taken_from_the_line() {
        let a = file_namespace("x\ny\n");
        let b = file_namespace("x\ny\nz\n");
        let id = |ns: &Uuid, n: usize| {
            prepare_line(n, "p1", ns, Some("create-ticket"), Some("t"))
                .unwrap()
                .unwrap()
                .message_id
        };
        assert_eq!(id(&a, 1), id(&a, 1));
        assert_ne!(
            id(&a, 1),
            id(&a, 2),
            "same text on another line is another command"
        );
        assert_ne!(id(&a, 1), id(&b, 1), "another file is another run");
        let given = prepare_line(
            1,
            r#"{"type":"create-ticket","profileId":"p","accessTokenId":"t","messageId":"m-1"}"#,
            &a,
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(given.message_id, "m-1");
        assert!(!given.body.contains("messageId"));
    }

    #[test]
    fn bad_lines_say_why_and_blank_lines_are_skipped() {
        assert_eq!(prepare_line(1, "   ", &NS, None, None), Ok(None));
        assert_eq!(prepare_line(1, "# comment", &NS, None, None), Ok(None));
        assert!(prepare_line(1, "{not json", &NS, None, None)
            .unwrap_err()
            .contains("JSON"));
        assert!(prepare_line(1, "[1]", &NS, None, None)
            .unwrap_err()
            .contains("object"));
        assert!(
            prepare_line(1, r#"{"type":"delete-profile"}"#, &NS, None, Some("t"))
                .unwrap_err()
                .contains("unknown type")
        );
        assert!(
            prepare_line(1, r#"{"profileId":"p"}"#, &NS, None, Some("t"))
                .unwrap_err()
                .contains("type")
        );
        assert!(prepare_line(1, "p1", &NS, Some("create-ticket"), None)
            .unwrap_err()
            .contains("PROVISION_ACCESS_TOKEN"));
        assert!(prepare_line(
            1,
            r#"{"type":"create-ticket","messageId":5}"#,
            &NS,
            None,
            Some("t")
        )
        .is_err());
        let missing = prepare_line(
            1,
            r#"{"type":"create-ticket","accessTokenId":"t"}"#,
            &NS,
            None,
            None,
        )
        .unwrap_err();
        assert!(missing.contains("profileId"), "{missing}");
    }

    #[test]
    fn summary_counts_by_status_and_code() {
        let s = summary(
            &[
                (200, None),
                (200, None),
                (403, Some("DISABLED_PROFILE".into())),
                (400, Some("PARAM_DESERIALIZATION_ERROR".into())),
            ],
            2,
        );
        assert_eq!(s, "6 lines: 200: 2, 400 PARAM_DESERIALIZATION_ERROR: 1, 403 DISABLED_PROFILE: 1, invalid lines: 2");
    }
}
