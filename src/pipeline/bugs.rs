//! Bugs this project has fixed, put back on request (feature `sim-bugs`,
//! which only the tests turn on): the simulation (`tests/simulation`) must
//! find each one, which shows it can fail.

/// One re-introduced bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Deliveries are acked when they arrive, before their commit and their
    /// replies' confirms: a crash in between loses the commands.
    AckBeforeCommit,
    /// A record whose message_id another transaction committed first is
    /// answered from this batch's own plan, not from the stored record: two
    /// deliveries of one command get different answers.
    AnswerLostFromOwnPlan,
    /// A batch decided on known rows is committed without their versions:
    /// a token revoked or a profile disabled after an earlier batch read it
    /// is still honoured.
    KnownRowsUnchecked,
}

impl Bug {
    pub const ALL: [Bug; 3] = [
        Bug::AckBeforeCommit,
        Bug::AnswerLostFromOwnPlan,
        Bug::KnownRowsUnchecked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Bug::AckBeforeCommit => "ack-before-commit",
            Bug::AnswerLostFromOwnPlan => "answer-lost-from-own-plan",
            Bug::KnownRowsUnchecked => "known-rows-unchecked",
        }
    }

    pub fn parse(s: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.as_str() == s)
    }
}
