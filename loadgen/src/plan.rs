//! What the load generator sends: a deterministic sequence of commands, each with
//! the reply status it must get and the row it must create. Pure.

use profile_worker::contract::CommandName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mix {
    /// Only create-ticket.
    Ticket,
    /// Only create-verification-token.
    Token,
    /// Both, alternating.
    Both,
}

/// The row a command must leave behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creates {
    Nothing,
    Ticket,
    VerificationToken,
}

/// Kinds of invalid command, taken in turn so every failure path is exercised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A body that does not decode: 400 and a dead letter.
    Malformed,
    /// An access token that does not exist: 403.
    UnknownToken,
    /// A profile that does not exist: 404.
    UnknownProfile,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub command: CommandName,
    pub body: String,
    pub expect_status: u16,
    pub creates: Creates,
    pub dead_letter: bool,
}

/// Who the commands act for: one access token allowed everything on the tenant,
/// and the profiles seeded for the run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mix: Mix,
    /// Share of commands that must be refused, 0.0..=1.0.
    pub invalid_share: f64,
    pub access_token_id: String,
    pub profile_ids: Vec<String>,
}

impl Plan {
    /// Whether command `i` is one of the invalid ones (`Err`, with its rank among
    /// them) or a valid one (`Ok`, with its rank among those). Spread evenly:
    /// exactly floor(n × share) of the first n commands are invalid, for every n.
    fn rank(&self, i: u64) -> Result<u64, u64> {
        let share = self.invalid_share.clamp(0.0, 1.0);
        let before = (i as f64 * share).floor() as u64;
        let after = ((i + 1) as f64 * share).floor() as u64;
        if after > before {
            Err(before)
        } else {
            Ok(i - before)
        }
    }

    pub fn command(&self, i: u64) -> Planned {
        // Valid and invalid commands each alternate the command by their own rank,
        // so both kinds get every outcome in equal shares.
        let rank = self.rank(i);
        let first_kind = match rank {
            Err(r) => (r / 3).is_multiple_of(2),
            Ok(r) => r.is_multiple_of(2),
        };
        let rank = rank.err();
        let command = match self.mix {
            Mix::Ticket => CommandName::CreateTicket,
            Mix::Token => CommandName::CreateVerificationToken,
            Mix::Both if first_kind => CommandName::CreateTicket,
            Mix::Both => CommandName::CreateVerificationToken,
        };
        let profile = &self.profile_ids[(i as usize) % self.profile_ids.len().max(1)];
        let invalid = rank.map(|rank| match rank % 3 {
            0 => Invalid::Malformed,
            1 => Invalid::UnknownToken,
            _ => Invalid::UnknownProfile,
        });
        let token = match invalid {
            Some(Invalid::UnknownToken) => "bench-no-such-token",
            _ => self.access_token_id.as_str(),
        };
        let profile = match invalid {
            Some(Invalid::UnknownProfile) => "bench-no-such-profile",
            _ => profile.as_str(),
        };
        let body = match (invalid, command) {
            (Some(Invalid::Malformed), _) => format!(r#"{{"accessTokenId":{i}}}"#),
            (_, CommandName::CreateTicket) => {
                serde_json::json!({"accessTokenId": token, "profileId": profile}).to_string()
            }
            (_, CommandName::CreateVerificationToken) => {
                serde_json::json!({"accessTokenId": token, "id": profile}).to_string()
            }
        };
        let (expect_status, creates) = match (invalid, command) {
            (Some(Invalid::Malformed), _) => (400, Creates::Nothing),
            (Some(Invalid::UnknownToken), _) => (403, Creates::Nothing),
            (Some(Invalid::UnknownProfile), _) => (404, Creates::Nothing),
            (None, CommandName::CreateTicket) => (200, Creates::Ticket),
            (None, CommandName::CreateVerificationToken) => (200, Creates::VerificationToken),
        };
        Planned {
            command,
            body,
            expect_status,
            creates,
            dead_letter: invalid == Some(Invalid::Malformed),
        }
    }
}

/// What a run of commands must have left behind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Expected {
    pub tickets: u64,
    pub verification_tokens: u64,
    pub dead_letters: u64,
}

impl Expected {
    pub fn add(&mut self, p: &Planned) {
        match p.creates {
            Creates::Ticket => self.tickets += 1,
            Creates::VerificationToken => self.verification_tokens += 1,
            Creates::Nothing => {}
        }
        if p.dead_letter {
            self.dead_letters += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profile_worker::contract::{decode, Incoming};

    fn plan(mix: Mix, share: f64) -> Plan {
        Plan {
            mix,
            invalid_share: share,
            access_token_id: "tok".into(),
            profile_ids: vec!["p1".into(), "p2".into(), "p3".into()],
        }
    }

    fn totals(p: &Plan, n: u64) -> (Expected, u64) {
        let mut e = Expected::default();
        let mut refused = 0;
        for i in 0..n {
            let c = p.command(i);
            e.add(&c);
            if c.expect_status != 200 {
                refused += 1;
            }
        }
        (e, refused)
    }

    #[test]
    fn invalid_share_is_exact_and_spread() {
        let (e, refused) = totals(&plan(Mix::Both, 0.1), 1000);
        assert_eq!(refused, 100);
        assert_eq!(e.tickets + e.verification_tokens, 900);
        // Malformed is one kind in three.
        assert_eq!(e.dead_letters, 34);
        let (_, none) = totals(&plan(Mix::Both, 0.0), 1000);
        assert_eq!(none, 0);
        let (all, every) = totals(&plan(Mix::Token, 1.0), 30);
        assert_eq!((every, all.verification_tokens), (30, 0));
    }

    #[test]
    fn invalid_commands_are_of_both_kinds() {
        let p = plan(Mix::Both, 0.1);
        let kinds: std::collections::HashSet<(CommandName, u16)> = (0..1000)
            .map(|i| p.command(i))
            .filter(|c| c.expect_status != 200)
            .map(|c| (c.command, c.expect_status))
            .collect();
        assert_eq!(
            kinds.len(),
            6,
            "400, 403 and 404 for both commands: {kinds:?}"
        );
        let (e, _) = totals(&p, 1000);
        assert_eq!((e.tickets, e.verification_tokens), (450, 450));
    }

    #[test]
    fn mix_decides_the_command() {
        let (t, _) = totals(&plan(Mix::Ticket, 0.0), 10);
        assert_eq!((t.tickets, t.verification_tokens), (10, 0));
        let (b, _) = totals(&plan(Mix::Both, 0.0), 10);
        assert_eq!((b.tickets, b.verification_tokens), (5, 5));
    }

    #[test]
    fn bodies_decode_as_the_worker_will_see_them() {
        let p = plan(Mix::Both, 0.5);
        for i in 0..12 {
            let c = p.command(i);
            let decoded = decode(Incoming {
                kind: Some(c.command.as_str()),
                routing_key: c.command.as_str(),
                content_type: Some("application/json"),
                body: c.body.as_bytes(),
                ..Default::default()
            });
            assert_eq!(decoded.is_err(), c.dead_letter, "command {i}: {}", c.body);
            if c.expect_status == 403 {
                assert!(c.body.contains("bench-no-such-token"));
            }
            if c.expect_status == 404 {
                assert!(c.body.contains("bench-no-such-profile"));
            }
        }
    }
}
