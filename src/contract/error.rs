//! The error catalogue: every code a reply can carry, with the HTTP status the
//! Crafter Profile REST operation would have answered.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    JsonSchema,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    NoSuchAccessTokenId,
    AccessDenied,
    NoSuchProfile,
    ActionDenied,
    DisabledProfile,
    ParamDeserializationError,
    UnknownCommand,
    /// The command's `message_id` was already used for a different command (§4).
    MessageIdConflict,
    /// Email cooldown (§3 rule 6).
    TooManyRequests,
    /// The profile's email is not one address (§3 rule 6): nothing is sent.
    InvalidEmailAddress,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::NoSuchAccessTokenId
            | ErrorCode::AccessDenied
            | ErrorCode::ActionDenied
            | ErrorCode::DisabledProfile => 403,
            ErrorCode::NoSuchProfile => 404,
            ErrorCode::ParamDeserializationError
            | ErrorCode::UnknownCommand
            | ErrorCode::InvalidEmailAddress => 400,
            ErrorCode::MessageIdConflict => 409,
            ErrorCode::TooManyRequests => 429,
        }
    }

    /// The code as replies and dead letters spell it (the same as serde's).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A command refused with a code and a human message (the body of every 4xx reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Rejection::new(ErrorCode::ParamDeserializationError, message)
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialized_code_matches_as_str() {
        // Every code: a new one is covered without touching this test.
        for code in <ErrorCode as strum::IntoEnumIterator>::iter() {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::String(code.as_str().into())
            );
        }
    }

    #[test]
    fn statuses_follow_crafter_profile() {
        assert_eq!(ErrorCode::NoSuchAccessTokenId.status(), 403);
        assert_eq!(ErrorCode::AccessDenied.status(), 403);
        assert_eq!(ErrorCode::NoSuchProfile.status(), 404);
        assert_eq!(ErrorCode::ActionDenied.status(), 403);
        assert_eq!(ErrorCode::DisabledProfile.status(), 403);
        assert_eq!(ErrorCode::ParamDeserializationError.status(), 400);
        assert_eq!(ErrorCode::UnknownCommand.status(), 400);
        assert_eq!(ErrorCode::MessageIdConflict.status(), 409);
        assert_eq!(ErrorCode::TooManyRequests.status(), 429);
    }
}
