//! Commands as they arrive: the JSON bodies of CONTRACT §2 and the decoding of
//! an AMQP message (type, content type, body) into one of them, with limits.

use super::error::{ErrorCode, Rejection};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_ID_CHARS: usize = 128;
pub const MAX_URL_CHARS: usize = 2048;
/// JSON Schema form of the control-character rule (CONTRACT §2).
const ID_PATTERN: &str = r"^[^\u0000-\u001F\u007F]*$";
/// JSON Schema form of the URL rules that a pattern can say: http(s), a host
/// without userinfo, RFC 3986 characters only (the decoder checks the rest).
const URL_PATTERN: &str = r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9\-._~:\[\]!$&()*+,;=%]+([/?#][A-Za-z0-9\-._~:/?#\[\]@!$&()*+,;=%]*)?$";

/// Declares [`CommandName`] and every name derived from a command's: its reply's
/// `type`, its exported span's name, the body field naming its profile. One
/// line per command; the compiler then finds every `match` that must learn it.
macro_rules! command_names {
    ($($variant:ident => $name:literal, profile in $field:literal;)+) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CommandName {
            $($variant),+
        }

        impl CommandName {
            pub const ALL: &'static [CommandName] = &[$(CommandName::$variant),+];

            /// The name publishers give as the `type` (or routing key).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(CommandName::$variant => $name),+
                }
            }

            /// The `type` property of the reply to this command.
            pub fn reply_type(self) -> &'static str {
                match self {
                    $(CommandName::$variant => concat!($name, ".reply")),+
                }
            }

            /// The exported span's name (OpenTelemetry's messaging convention:
            /// the destination, then the operation).
            pub fn process_span_name(self) -> &'static str {
                match self {
                    $(CommandName::$variant => concat!($name, " process")),+
                }
            }

            /// The body field that names the profile the command is about.
            pub fn profile_field(self) -> &'static str {
                match self {
                    $(CommandName::$variant => $field),+
                }
            }
        }
    };
}

command_names! {
    CreateTicket => "create-ticket", profile in "profileId";
    CreateVerificationToken => "create-verification-token", profile in "id";
}

/// The reply's `type` when the command is unknown.
pub const UNKNOWN_REPLY_TYPE: &str = "error.reply";
/// The command label (logs, metrics, span names) when the command is unknown.
pub const UNKNOWN_COMMAND: &str = "unknown";

impl CommandName {
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == name)
    }

    /// Every command's name, for messages that list them.
    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().map(|c| c.as_str())
    }

    /// The names as a message lists them: `"a", "b" or "c"`.
    pub fn listed() -> String {
        let quoted: Vec<String> = Self::names().map(|n| format!("\"{n}\"")).collect();
        match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }
}

/// Body of `create-ticket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTicket {
    /// The caller's access token (a bearer secret).
    #[schemars(length(min = 1, max = 128), regex(pattern = ID_PATTERN))]
    pub access_token_id: String,
    /// The profile the ticket authenticates.
    #[schemars(length(min = 1, max = 128), regex(pattern = ID_PATTERN))]
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
    #[schemars(length(min = 1, max = 128), regex(pattern = ID_PATTERN))]
    pub access_token_id: String,
    /// The profile to verify.
    #[schemars(length(min = 1, max = 128), regex(pattern = ID_PATTERN))]
    pub id: String,
    /// `verify-account` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    /// Absolute http(s) URL, the base of the link in the email; the worker's
    /// configured default applies when absent. A host and no userinfo; only
    /// characters RFC 3986 allows, less `'`; no `%` but in a percent-encoded
    /// byte; no `tokenId` parameter (the worker appends it). When the profile's
    /// tenant has `linkHosts`, the host must be one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), url, regex(pattern = URL_PATTERN))]
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

/// SHA-256 over the command type and its decoded body with defaults applied (the
/// access token ID included): what binds an idempotency record to its caller
/// (CONTRACT §4). Two commands share a fingerprint only if they mean the same.
pub type Fingerprint = [u8; 32];

impl Command {
    pub fn fingerprint(&self) -> Fingerprint {
        use sha2::{Digest, Sha256};
        let body = match self {
            Command::CreateTicket(c) => serde_json::to_vec(c),
            Command::CreateVerificationToken(c) => serde_json::to_vec(&CreateVerificationToken {
                purpose: Some(c.purpose.unwrap_or_default()),
                ..c.clone()
            }),
        }
        .expect("commands always serialize");
        let mut h = Sha256::new();
        h.update(self.name().as_str().as_bytes());
        h.update([0]);
        h.update(&body);
        h.finalize().into()
    }
}

/// The parts of an AMQP message that decoding looks at.
#[derive(Debug, Default, Clone, Copy)]
pub struct Incoming<'a> {
    /// The `type` property.
    pub kind: Option<&'a str>,
    /// The `message_id` property: stored as the idempotency key.
    pub message_id: Option<&'a str>,
    /// The `correlation_id` property: copied onto the reply.
    pub correlation_id: Option<&'a str>,
    pub routing_key: &'a str,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

impl<'a> Incoming<'a> {
    /// The command name the publisher meant: `type`, else the routing key
    /// (CONTRACT §2). The one place this rule is written.
    pub fn kind(&self) -> &'a str {
        match self.kind {
            Some(k) if !k.is_empty() => k,
            _ => self.routing_key,
        }
    }
}

/// Decodes a message into a command, or says precisely what is wrong with it.
pub fn decode(msg: Incoming<'_>) -> Result<Command, Rejection> {
    for (property, value) in [
        ("message_id", msg.message_id),
        ("correlation_id", msg.correlation_id),
    ] {
        if let Some(v) = value {
            check_property(property, v)?;
        }
    }
    let kind = msg.kind();
    let Some(name) = CommandName::parse(kind) else {
        return Err(Rejection::new(
            ErrorCode::UnknownCommand,
            format!(
                "Unknown command type \"{}\": expected {}",
                truncate_for_message(kind),
                CommandName::listed()
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

/// U+0000–U+001F and U+007F: never part of an id or a link, and NUL is refused
/// by Postgres' text type (it would fail the batch instead of the command).
pub fn is_control(c: char) -> bool {
    c <= '\u{1f}' || c == '\u{7f}'
}

fn check_no_control(field: &str, value: &str) -> Result<(), Rejection> {
    match value.chars().position(is_control) {
        None => Ok(()),
        Some(at) => {
            let c = value.chars().nth(at).unwrap_or_default() as u32;
            Err(Rejection::malformed(format!(
                "Field \"{field}\" contains a control character (U+{c:04X}) at position {at}"
            )))
        }
    }
}

/// What the AMQP parser makes of bytes that are not UTF-8 in a short string
/// (the vendored amq-protocol-types decodes them lossily rather than failing
/// the connection: docs/ARCHITECTURE.md, "Hostile properties").
pub const NOT_UTF8: char = char::REPLACEMENT_CHARACTER;

/// A property the worker stores or sends back: no control character (NUL
/// would fail the batch's SQL, not the command) and no byte that was not UTF-8.
fn check_property(property: &str, value: &str) -> Result<(), Rejection> {
    if let Some(at) = value.chars().position(|c| c == NOT_UTF8) {
        return Err(Rejection::malformed(format!(
            "Property \"{property}\" is not valid UTF-8 (an invalid byte sequence at character {at})"
        )));
    }
    match value.chars().position(is_control) {
        None => Ok(()),
        Some(at) => {
            let c = value.chars().nth(at).unwrap_or_default() as u32;
            Err(Rejection::malformed(format!(
                "Property \"{property}\" contains a control character (U+{c:04X}) at position {at}"
            )))
        }
    }
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
    check_no_control(field, value)
}

/// Characters RFC 3986 allows in a URI (unreserved, reserved and `%`), less the
/// single quote: a link goes into HTML emails, where `'` ends an attribute.
fn is_uri_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&()*+,;=%".contains(c)
}

/// The base of the email link must be something a mail client can open, made of
/// nothing a caller could use to change the email around it (CONTRACT §2).
/// Returns the URL's host, lower-cased, for the tenant's `linkHosts` check.
pub fn check_verification_url(value: &str) -> Result<String, Rejection> {
    let bad = |why: &str| Rejection::malformed(format!("Field \"verificationUrl\" {why}"));
    let chars = value.chars().count();
    if chars == 0 {
        return Err(bad("must not be empty"));
    }
    if chars > MAX_URL_CHARS {
        return Err(bad(&format!("is longer than {MAX_URL_CHARS} characters")));
    }
    check_no_control("verificationUrl", value)?;
    if let Some((at, c)) = value.char_indices().find(|&(_, c)| !is_uri_char(c)) {
        return Err(bad(&format!(
            "contains {c:?} at byte {at}, which is not allowed in a URL"
        )));
    }
    for (at, _) in value.match_indices('%') {
        let hex = value.as_bytes().get(at + 1..at + 3);
        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
            return Err(bad(&format!(
                "has a '%' at byte {at} that does not start a percent-encoded byte"
            )));
        }
    }
    let scheme_end = value.find("://").unwrap_or(0);
    let scheme = &value[..scheme_end];
    if !(scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http")) {
        return Err(bad("must be an absolute http or https URL"));
    }
    let rest = &value[scheme_end + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.is_empty() {
        return Err(bad("must have a host"));
    }
    if authority.contains('@') {
        return Err(bad("must not contain userinfo (\"user@\")"));
    }
    if value.to_ascii_lowercase().contains("tokenid=") {
        return Err(bad(
            "must not contain a tokenId parameter: the worker appends it",
        ));
    }
    let url = url::Url::parse(value).map_err(|e| bad(&format!("is not a valid URL: {e}")))?;
    match url.host_str() {
        Some(host) if !host.is_empty() => Ok(host.to_ascii_lowercase()),
        _ => Err(bad("must have a host")),
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
/// What a caller typed, made safe to quote in a reply or a log line: at most 64
/// characters, control characters escaped.
fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s
        .chars()
        .take(MAX)
        .flat_map(|c| {
            if is_control(c) {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
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
            ..Default::default()
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
    fn properties_that_are_stored_or_sent_back_must_be_clean_text() {
        let body = r#"{"accessTokenId":"t","profileId":"p"}"#;
        for (message_id, correlation_id, want) in [
            (Some("a\0b"), None, "Property \"message_id\" contains a control character (U+0000) at position 1"),
            (None, Some("x\u{7f}"), "Property \"correlation_id\" contains a control character (U+007F) at position 1"),
            (Some("ok\u{fffd}"), None, "Property \"message_id\" is not valid UTF-8 (an invalid byte sequence at character 2)"),
        ] {
            let m = Incoming {
                message_id,
                correlation_id,
                ..msg("create-ticket", body)
            };
            let r = err(m);
            assert_eq!(r.code, ErrorCode::ParamDeserializationError);
            assert_eq!(r.message, want);
        }
        let fine = Incoming {
            message_id: Some("7d1c-é-✓"),
            correlation_id: Some("c-1"),
            ..msg("create-ticket", body)
        };
        assert!(decode(fine).is_ok());
    }

    #[test]
    fn type_falls_back_to_routing_key() {
        let m = Incoming {
            kind: None,
            routing_key: "create-ticket",
            content_type: None,
            body: br#"{"accessTokenId":"t","profileId":"p"}"#,
            ..Default::default()
        };
        assert_eq!(decode(m).unwrap().name(), CommandName::CreateTicket);
    }

    #[test]
    fn unknown_command() {
        let r = err(msg("delete-everything", "{}"));
        assert_eq!(r.code, ErrorCode::UnknownCommand);
        assert_eq!(
            r.message,
            r#"Unknown command type "delete-everything": expected "create-ticket" or "create-verification-token""#
        );
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
            ..Default::default()
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

    #[test]
    fn control_characters_are_refused_naming_the_field() {
        for (field, body) in [
            (
                "profileId",
                r#"{"accessTokenId":"t","profileId":"abc\u0000def"}"#,
            ),
            (
                "accessTokenId",
                r#"{"accessTokenId":"t\u001f","profileId":"p"}"#,
            ),
            (
                "profileId",
                r#"{"accessTokenId":"t","profileId":"p\u007f"}"#,
            ),
        ] {
            let r = err(msg("create-ticket", body));
            assert_eq!(r.code, ErrorCode::ParamDeserializationError);
            assert!(
                r.message.contains(&format!("\"{field}\"")) && r.message.contains("control"),
                "{body}: {}",
                r.message
            );
        }
        let r = err(msg(
            "create-verification-token",
            r#"{"accessTokenId":"t","id":"p\n"}"#,
        ));
        assert!(r.message.contains("\"id\""), "{}", r.message);
        let r = err(msg(
            "create-verification-token",
            r#"{"accessTokenId":"t","id":"p","verificationUrl":"https://x.test/v\r\nBcc: a@b"}"#,
        ));
        assert!(r.message.contains("verificationUrl"), "{}", r.message);
        // DEL and C0 only: other characters are fine in ids.
        assert!(decode(msg(
            "create-ticket",
            r#"{"accessTokenId":"t","profileId":"p\u0080é"}"#
        ))
        .is_ok());
    }

    #[test]
    fn unknown_types_are_quoted_without_their_control_characters() {
        let r = err(msg("x\u{0}\r\n", "{}"));
        assert!(!r.message.chars().any(is_control), "{:?}", r.message);
    }

    #[test]
    fn verification_urls_are_links_nobody_can_bend() {
        let url = |u: &str| check_verification_url(u);
        for ok in [
            "https://example.com/verify",
            "http://example.com:8080/v?a=1&b=%20#/route",
            "HTTPS://Example.com/v",
            "https://[::1]/v",
            "https://example.com/a@b",
        ] {
            assert!(url(ok).is_ok(), "{ok}: {:?}", url(ok));
        }
        assert_eq!(url("HTTPS://Example.COM/v").unwrap(), "example.com");
        for bad in [
            "https://trusted.example@evil.example/",
            "https://@evil.example/",
            "https://user:pw@example.com/",
            "https://example.com/v\r\nBcc: x@y",
            "https://example.com/<script>",
            "https://example.com/\"onmouseover",
            "https://example.com/'x",
            "https://example.com/a b",
            "https://example.com\\@evil.example/",
            "https://example.com/%zz",
            "https://example.com/%4",
            "javascript:alert(1)",
            "//example.com/v",
            "https:///v",
            "https://example.com/v?tokenId=123",
            "",
        ] {
            let r = url(bad).unwrap_err();
            assert_eq!(r.code, ErrorCode::ParamDeserializationError, "{bad}");
            assert!(
                r.message.contains("verificationUrl"),
                "{bad}: {}",
                r.message
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert!(url(&long).unwrap_err().message.contains("2048"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Strings made to hit the rules: control characters, URL syntax, non-ASCII.
        fn nasty() -> impl Strategy<Value = String> {
            proptest::string::string_regex(
                "[a-zA-Z0-9:/?#@%&=.\\-_~\\[\\]<>\"' \\\\\\x00-\\x1f\\x7féé€]{0,40}",
            )
            .unwrap()
        }

        fn url_like() -> impl Strategy<Value = String> {
            (
                prop_oneof![Just("https://"), Just("http://"), Just("ftp://"), Just("")],
                nasty(),
                prop_oneof![
                    Just("example.com"),
                    Just("a.example.com"),
                    Just("x@evil.test"),
                    Just("")
                ],
                nasty(),
            )
                .prop_map(|(s, a, h, b)| format!("{s}{a}{h}{b}"))
        }

        proptest! {
            /// Whatever bytes arrive, decoding answers (never panics).
            #[test]
            fn decode_never_panics(
                kind in prop_oneof![Just("create-ticket".to_string()), Just("create-verification-token".to_string()), nasty()],
                body in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let _ = decode(Incoming { kind: Some(&kind), body: &body, ..Default::default() });
            }

            /// What decoding accepts obeys every limit, and the body it came
            /// from validates against the committed JSON Schema.
            #[test]
            fn accepted_commands_obey_the_limits_and_the_schema(
                token in nasty(), profile in nasty(), url in proptest::option::of(url_like()),
                purpose in proptest::option::of(prop_oneof![Just("verify-account"), Just("reset-password"), Just("other")]),
                ticket in any::<bool>(),
            ) {
                let (kind, body) = if ticket {
                    ("create-ticket", serde_json::json!({"accessTokenId": token, "profileId": profile}))
                } else {
                    let mut b = serde_json::json!({"accessTokenId": token, "id": profile});
                    if let Some(u) = &url { b["verificationUrl"] = u.clone().into(); }
                    if let Some(p) = purpose { b["purpose"] = p.into(); }
                    ("create-verification-token", b)
                };
                let text = body.to_string();
                let Ok(c) = decode(msg(kind, &text)) else { return Ok(()); };
                for id in [c.access_token_id(), c.profile_id()] {
                    prop_assert!((1..=MAX_ID_CHARS).contains(&id.chars().count()));
                    prop_assert!(!id.chars().any(is_control));
                }
                if let Command::CreateVerificationToken(v) = &c {
                    if let Some(u) = &v.verification_url {
                        prop_assert!(u.chars().count() <= MAX_URL_CHARS);
                        prop_assert!(u.chars().all(is_uri_char));
                        let parsed = url::Url::parse(u).unwrap();
                        prop_assert!(matches!(parsed.scheme(), "http" | "https"));
                        prop_assert!(parsed.username().is_empty() && parsed.password().is_none());
                    }
                }
                let file = if ticket { "create-ticket.command.json" } else { "create-verification-token.command.json" };
                let schema: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(format!("{}/schemas/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap(),
                ).unwrap();
                let validator = jsonschema::validator_for(&schema).unwrap();
                prop_assert!(validator.is_valid(&body), "{} accepted but not valid against {}", text, file);
            }

            /// Any accepted verificationUrl gives a link that re-parses, keeps the
            /// base's host and carries exactly one tokenId.
            #[test]
            fn accepted_urls_make_sound_links(url in url_like(), id in any::<u128>()) {
                let Ok(host) = check_verification_url(&url) else { return Ok(()); };
                let id = uuid::Uuid::from_u128(id);
                let link = crate::domain::verification_link(&url, id);
                let parsed = url::Url::parse(&link);
                prop_assert!(parsed.is_ok(), "{} does not re-parse", link);
                let parsed = parsed.unwrap();
                prop_assert_eq!(parsed.host_str().map(str::to_ascii_lowercase), Some(host));
                prop_assert_eq!(link.matches("tokenId=").count(), 1);
                let tail = format!("tokenId={id}");
                prop_assert!(link.ends_with(&tail));
            }
        }
    }
}
