//! The outside of the system (CONTRACT.md): commands, replies, events, error codes.
//! Pure types and decoding; no I/O.

pub mod command;
pub mod error;
pub mod message;
pub mod schema;

pub use command::{
    decode, Command, CommandName, CreateTicket, CreateVerificationToken, Incoming, Purpose,
};
pub use error::{ErrorCode, Rejection};
pub use message::{
    EmailRequested, ErrorReply, InternalErrorReply, TicketCreated, VerificationTokenCreated,
};
