//! Commands as they arrive: the JSON bodies of CONTRACT §2 and the decoding of
//! an AMQP message (type, content type, body) into one of them, with limits.

use super::error::{ErrorCode, Rejection};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_ID_CHARS: usize = 128;
pub const MAX_URL_CHARS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    CreateTicket,
    CreateVerificationToken,
}

impl CommandName {
    pub const ALL: [CommandName; 2] = [
        CommandName::CreateTicket,
        CommandName::CreateVerificationToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::CreateTicket => "create-ticket",
            CommandName::CreateVerificationToken => "create-verification-token",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The `type` property of the reply to this command.
    pub fn reply_type(self) -> &'static str {
        match self {
            CommandName::CreateTicket => "create-ticket.reply",
            CommandName::CreateVerificationToken => "create-verification-token.reply",
        }
    }
}

/// Body of `create-ticket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTicket {
    /// The caller's access token (a bearer secret).
    #[schemars(length(min = 1, max = 128))]
    pub access_token_id: String,
    /// The profile the ticket authenticates.
    #[schemars(length(min = 1, max = 128))]
    pub profile_id: String,
}

/// What the verification email is for; also the email template's name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    #[default]
    VerifyAccount,
    ResetPassword,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::VerifyAccount => "verify-account",
            Purpose::ResetPassword => "reset-password",
        }
    }
}

/// Body of `create-verification-token` (the profile field is `id`, as in the REST operation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVerificationToken {
    /// The caller's access token (a bearer secret).
    #[schemars(length(min = 1, max = 128))]
    pub access_token_id: String,
    /// The profile to verify.
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// `verify-account` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    /// Absolute http(s) URL, the base of the link in the email; the worker's
    /// configured default applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), url)]
    pub verification_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    CreateTicket(CreateTicket),
    CreateVerificationToken(CreateVerificationToken),
}

impl Command {
    pub fn name(&self) -> CommandName {
        match self {
            Command::CreateTicket(_) => CommandName::CreateTicket,
            Command::CreateVerificationToken(_) => CommandName::CreateVerificationToken,
        }
    }

    pub fn access_token_id(&self) -> &str {
        match self {
            Command::CreateTicket(c) => &c.access_token_id,
            Command::CreateVerificationToken(c) => &c.access_token_id,
        }
    }

    pub fn profile_id(&self) -> &str {
        match self {
            Command::CreateTicket(c) => &c.profile_id,
            Command::CreateVerificationToken(c) => &c.id,
        }
    }
}

/// The parts of an AMQP message that decoding looks at.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The `type` property.
    pub kind: Option<&'a str>,
    pub routing_key: &'a str,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

impl Incoming<'_> {
    /// The command name the publisher meant: `type`, else the routing key.
    pub fn kind(&self) -> &str {
        match self.kind {
            Some(k) if !k.is_empty() => k,
            _ => self.routing_key,
        }
    }
}

/// Decodes a message into a command, or says precisely what is wrong with it.
pub fn decode(msg: Incoming<'_>) -> Result<Command, Rejection> {
    let kind = msg.kind();
    let Some(name) = CommandName::parse(kind) else {
        return Err(Rejection::new(
            ErrorCode::UnknownCommand,
            format!(
                "Unknown command type \"{}\": expected \"create-ticket\" or \"create-verification-token\"",
                truncate_for_message(kind)
            ),
        ));
    };
    if let Some(ct) = msg.content_type {
        if !is_json_media_type(ct) {
            return Err(Rejection::malformed(format!(
                "Unsupported content_type \"{}\": expected \"application/json\"",
                truncate_for_message(ct)
            )));
        }
    }
    if msg.body.len() > MAX_BODY_BYTES {
        return Err(Rejection::malformed(format!(
            "Body is {} bytes, over the limit of {MAX_BODY_BYTES} bytes",
            msg.body.len()
        )));
    }
    let text = std::str::from_utf8(msg.body).map_err(|e| {
        Rejection::malformed(format!(
            "Body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Rejection::malformed(format!("Body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Rejection::malformed(format!(
            "Body must be a JSON object, not {}",
            json_kind(&value)
        )));
    }
    let command = match name {
        CommandName::CreateTicket => {
            let c: CreateTicket = from_value(value)?;
            check_id("accessTokenId", &c.access_token_id)?;
            check_id("profileId", &c.profile_id)?;
            Command::CreateTicket(c)
        }
        CommandName::CreateVerificationToken => {
            let c: CreateVerificationToken = from_value(value)?;
            check_id("accessTokenId", &c.access_token_id)?;
            check_id("id", &c.id)?;
            if let Some(url) = &c.verification_url {
                check_verification_url(url)?;
            }
            Command::CreateVerificationToken(c)
        }
    };
    Ok(command)
}

fn from_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, Rejection> {
    // serde_path_to_error names the field for type errors too ("profileId: invalid type ...").
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            Rejection::malformed(format!("Invalid body: {inner}"))
        } else {
            Rejection::malformed(format!("Invalid field \"{path}\": {inner}"))
        }
    })
}

fn check_id(field: &str, value: &str) -> Result<(), Rejection> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err(Rejection::malformed(format!(
            "Field \"{field}\" must not be empty"
        )));
    }
    if chars > MAX_ID_CHARS {
        return Err(Rejection::malformed(format!(
            "Field \"{field}\" is {chars} characters long, over the limit of {MAX_ID_CHARS}"
        )));
    }
    Ok(())
}

/// The base of the email link must be something a mail client can open.
pub fn check_verification_url(value: &str) -> Result<(), Rejection> {
    let bad = |why: &str| Rejection::malformed(format!("Field \"verificationUrl\" {why}"));
    if value.chars().count() > MAX_URL_CHARS {
        return Err(bad(&format!("is longer than {MAX_URL_CHARS} characters")));
    }
    match url::Url::parse(value) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => Ok(()),
        Ok(_) => Err(bad("must be an absolute http or https URL")),
        Err(e) => Err(bad(&format!("is not a valid URL: {e}"))),
    }
}

fn is_json_media_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Publisher-supplied text echoed in an error message is kept short.
fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<'a>(kind: &'a str, body: &'a str) -> Incoming<'a> {
        Incoming {
            kind: Some(kind),
            routing_key: "",
            content_type: Some("application/json"),
            body: body.as_bytes(),
        }
    }

    fn err(m: Incoming<'_>) -> Rejection {
        decode(m).expect_err("should be rejected")
    }

    #[test]
    fn decodes_create_ticket() {
        let c = decode(msg(
            "create-ticket",
            r#"{"accessTokenId":"t","profileId":"p"}"#,
        ))
        .unwrap();
        assert_eq!(c.name(), CommandName::CreateTicket);
        assert_eq!(c.access_token_id(), "t");
        assert_eq!(c.profile_id(), "p");
    }

    #[test]
    fn decodes_verification_token_with_optional_fields() {
        let c = decode(msg(
            "create-verification-token",
            r#"{"accessTokenId":"t","id":"p","purpose":"reset-password","verificationUrl":"https://x.test/r?a=1"}"#,
        ))
        .unwrap();
        match c {
            Command::CreateVerificationToken(v) => {
                assert_eq!(v.purpose, Some(Purpose::ResetPassword));
                assert_eq!(v.verification_url.as_deref(), Some("https://x.test/r?a=1"));
            }
            other => panic!("{other:?}"),
        }
        let c = decode(msg(
            "create-verification-token",
            r#"{"accessTokenId":"t","id":"p"}"#,
        ))
        .unwrap();
        assert_eq!(c.profile_id(), "p");
    }

    #[test]
    fn type_falls_back_to_routing_key() {
        let m = Incoming {
            kind: None,
            routing_key: "create-ticket",
            content_type: None,
            body: br#"{"accessTokenId":"t","profileId":"p"}"#,
        };
        assert_eq!(decode(m).unwrap().name(), CommandName::CreateTicket);
    }

    #[test]
    fn unknown_command() {
        let r = err(msg("delete-everything", "{}"));
        assert_eq!(r.code, ErrorCode::UnknownCommand);
        assert!(r.message.contains("delete-everything"));
    }

    #[test]
    fn rejects_wrong_content_type_but_accepts_charset_parameter() {
        let mut m = msg("create-ticket", r#"{"accessTokenId":"t","profileId":"p"}"#);
        m.content_type = Some("text/plain");
        assert!(err(m).message.contains("content_type"));
        m.content_type = Some("application/json; charset=utf-8");
        assert!(decode(m).is_ok());
    }

    #[test]
    fn rejects_bodies_that_are_not_json_objects() {
        assert!(err(msg("create-ticket", "not json"))
            .message
            .contains("not valid JSON"));
        assert!(err(msg("create-ticket", "[1,2]"))
            .message
            .contains("an array"));
        assert!(err(msg("create-ticket", "\"x\""))
            .message
            .contains("a string"));
        assert!(err(msg("create-ticket", ""))
            .message
            .contains("not valid JSON"));
    }

    #[test]
    fn names_the_field_in_schema_errors() {
        let r = err(msg("create-ticket", r#"{"accessTokenId":"t"}"#));
        assert!(r.message.contains("profileId"), "{}", r.message);
        let r = err(msg(
            "create-ticket",
            r#"{"accessTokenId":"t","profileId":5}"#,
        ));
        assert!(
            r.message.contains("profileId") && r.message.contains("invalid type"),
            "{}",
            r.message
        );
        let r = err(msg(
            "create-ticket",
            r#"{"accessTokenId":"t","profileId":"p","x":1}"#,
        ));
        assert!(r.message.contains("unknown field `x`"), "{}", r.message);
        let r = err(msg(
            "create-verification-token",
            r#"{"accessTokenId":"t","id":"p","purpose":"nope"}"#,
        ));
        assert!(r.message.contains("purpose"), "{}", r.message);
        assert_eq!(r.code, ErrorCode::ParamDeserializationError);
    }

    #[test]
    fn enforces_id_limits() {
        let r = err(msg(
            "create-ticket",
            r#"{"accessTokenId":"","profileId":"p"}"#,
        ));
        assert!(r.message.contains("accessTokenId") && r.message.contains("empty"));
        let long = "x".repeat(129);
        let body = format!(r#"{{"accessTokenId":"t","profileId":"{long}"}}"#);
        assert!(err(msg("create-ticket", &body))
            .message
            .contains("profileId"));
        let ok = "é".repeat(128);
        let body = format!(r#"{{"accessTokenId":"t","profileId":"{ok}"}}"#);
        assert!(
            decode(msg("create-ticket", &body)).is_ok(),
            "128 characters, more bytes"
        );
    }

    #[test]
    fn enforces_body_size_and_utf8() {
        let big = format!(
            r#"{{"accessTokenId":"{}","profileId":"p"}}"#,
            "x".repeat(MAX_BODY_BYTES)
        );
        assert!(err(msg("create-ticket", &big))
            .message
            .contains("over the limit"));
        let m = Incoming {
            kind: Some("create-ticket"),
            routing_key: "",
            content_type: None,
            body: b"{\"accessTokenId\":\"\xff\"}",
        };
        assert!(err(m).message.contains("UTF-8"));
    }

    #[test]
    fn verification_url_must_be_absolute_http() {
        for bad in ["/relative", "mailto:x@y.z", "ftp://x.test/", "not a url"] {
            let body = format!(r#"{{"accessTokenId":"t","id":"p","verificationUrl":"{bad}"}}"#);
            let r = err(msg("create-verification-token", &body));
            assert!(
                r.message.contains("verificationUrl"),
                "{bad}: {}",
                r.message
            );
        }
    }
}
