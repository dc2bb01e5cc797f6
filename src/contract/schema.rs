//! JSON Schemas of every message body, generated from the Rust types so they cannot
//! drift: `tests/integration/schemas.rs` fails when the committed files in `schemas/` differ.

use super::*;
use schemars::{schema_for, Schema};

/// (file name in `schemas/`, schema) for every body the contract defines.
pub fn all() -> Vec<(&'static str, Schema)> {
    vec![
        ("create-ticket.command.json", schema_for!(CreateTicket)),
        (
            "create-verification-token.command.json",
            schema_for!(CreateVerificationToken),
        ),
        ("create-ticket.reply.json", schema_for!(TicketCreated)),
        (
            "create-verification-token.reply.json",
            schema_for!(VerificationTokenCreated),
        ),
        ("error.reply.json", schema_for!(ErrorReply)),
        ("internal-error.reply.json", schema_for!(InternalErrorReply)),
        ("ticket.created.event.json", schema_for!(TicketCreatedEvent)),
        (
            "verification-token.created.event.json",
            schema_for!(VerificationTokenCreatedEvent),
        ),
        ("email.requested.event.json", schema_for!(EmailRequested)),
    ]
}

/// The schema file's text, as committed.
pub fn render(schema: &Schema) -> String {
    let mut schema = schema.clone();
    schema.insert(
        "$comment".into(),
        "Part of profile-worker's contract: docs/CONTRACT.md, whose rules this body's fields follow".into(),
    );
    let mut s = serde_json::to_string_pretty(&schema).expect("schemas serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adding a command (docs/ARCHITECTURE.md, "To add a command") is not done
    /// until its command and reply bodies have schemas, and the reply's `type`
    /// names its reply schema.
    #[test]
    fn every_command_has_its_command_and_reply_schemas() {
        let files: Vec<&str> = all().iter().map(|(f, _)| *f).collect();
        for name in CommandName::ALL {
            let command = format!("{}.command.json", name.as_str());
            let reply = format!("{}.json", name.reply_type());
            assert!(files.contains(&command.as_str()), "no {command}");
            assert!(files.contains(&reply.as_str()), "no {reply}");
        }
        assert!(files.contains(&format!("{}.json", command::UNKNOWN_REPLY_TYPE).as_str()));
    }
}
