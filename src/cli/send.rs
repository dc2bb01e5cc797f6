//! `profile-worker send`: publish one command and print its reply — the quickest
//! way to talk to a running worker from a shell.

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use profile_worker::broker::properties;
use profile_worker::client::{command_properties, reply_channel};

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

/// The command's body: from `--file`, from standard input (no argument, or
/// `-`), or, with a warning, from the argument.
pub fn body(arg: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    if let Some(path) = file {
        return std::fs::read_to_string(&path)
            .with_context(|| format!("reading the command's body from {}", path.display()));
    }
    match arg.filter(|a| a != "-") {
        Some(body) => {
            eprintln!(
                "warning: a body given as an argument, and the access token in it, is visible to \
                 every user of this machine (ps, /proc) and stays in your shell's history; \
                 pipe it in (… | profile-worker send COMMAND) or use --file"
            );
            Ok(body)
        }
        None => {
            let mut stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!(
                    "reading the command's JSON body from standard input (end it with Ctrl-D)"
                );
            }
            let mut body = String::new();
            stdin
                .read_to_string(&mut body)
                .context("reading the command's body from standard input")?;
            Ok(body.trim_end().to_string())
        }
    }
}

/// Sends `body` as command `kind` and returns (status, reply body).
pub async fn run(
    settings: &super::Commands,
    kind: &str,
    body: &str,
    timeout: Duration,
) -> anyhow::Result<(i64, String)> {
    let conn = super::connect(&settings.address).await?;
    let (channel, mut replies) = reply_channel(&conn).await?;
    let message_id = uuid::Uuid::new_v4().to_string();
    let props = command_properties(kind, &message_id, &message_id);
    let confirm = channel
        .basic_publish(
            settings.command_exchange.as_str().into(),
            kind.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await?
        .await?;
    if confirm.is_nack() {
        anyhow::bail!("the broker refused the command");
    }
    let reply = tokio::time::timeout(timeout, replies.next())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no reply within {} s: is `profile-worker run` running?",
                timeout.as_secs()
            )
        })?
        .context("reply consumer closed")??;
    let status = properties::reply_status(&reply.properties);
    let _ = conn.close(200, "bye".into()).await;
    Ok((status, String::from_utf8_lossy(&reply.data).into_owned()))
}
