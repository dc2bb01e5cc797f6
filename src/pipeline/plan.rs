//! What a batch does, decided without I/O: for each command, whether it is
//! malformed, a repeat of a remembered command, a `message_id` reused for a
//! different command, or new (then the domain decides), and which rows the new
//! ones write. The caller loads what the batch needs first (or recalls it,
//! `known`) and commits after.

use crate::contract::command::Fingerprint;
use crate::contract::{Command, ErrorCode, Rejection, Reply};
use crate::domain::{self, Outcome, Tenant};
use crate::records::{Created, EmailClaim, Loaded, NewRecord, StoredReply, TraceHeaders};
use crate::render;
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// One command of the batch, as the plan sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub decoded: &'a Result<Command, Rejection>,
    pub message_id: Option<&'a str>,
    /// The worker's span for this command: the events it causes carry it.
    pub trace: &'a TraceHeaders,
    /// Its `reply_to` names no reply queue (CONTRACT §2): not processed at all.
    pub reply_to_refused: bool,
}

/// What happens to one command: one step per input, in the inputs' order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Dead-lettered unprocessed, without a reply: its `reply_to` names no reply queue.
    ReplyToRefused,
    /// Answered 400 and dead-lettered.
    Malformed(Rejection),
    /// Answered and acked; nothing stored (unknown or expired token, email
    /// cooldown, a `message_id` already used for a different command).
    Rejected(Rejection),
    /// A repeat of a remembered command: its stored reply (and unconfirmed events) again.
    Stored(StoredReply),
    /// A record of the plan, written by the commit; with the error code when
    /// the domain refused the command (a remembered rejection).
    New {
        record: usize,
        rejected: Option<ErrorCode>,
    },
    /// The same command (same `message_id`, same fingerprint) as step `j` of this batch.
    SameAs(usize),
}

#[derive(Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub records: Vec<NewRecord>,
}

/// What the plan needs besides the inputs and the loaded rows.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    pub now_ms: i64,
    pub default_verification_url: &'a str,
    pub email_cooldown_secs: u64,
}

/// What a batch must load: each key once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Keys<'a> {
    pub access_token_ids: Vec<&'a str>,
    pub profile_ids: Vec<&'a str>,
    /// Of well-formed commands only: a malformed one is never remembered.
    pub message_ids: Vec<&'a str>,
}

pub fn keys<'a>(inputs: &[Input<'a>]) -> Keys<'a> {
    let processed = inputs.iter().filter(|i| !i.reply_to_refused);
    let commands = processed.clone().filter_map(|i| i.decoded.as_ref().ok());
    let mut k = Keys {
        access_token_ids: commands.clone().map(|c| c.access_token_id()).collect(),
        profile_ids: commands.map(|c| c.profile_id()).collect(),
        message_ids: processed
            .filter(|i| i.decoded.is_ok())
            .filter_map(|i| i.message_id)
            .collect(),
    };
    for v in [
        &mut k.access_token_ids,
        &mut k.profile_ids,
        &mut k.message_ids,
    ] {
        v.sort_unstable();
        v.dedup();
    }
    k
}

/// The 409 of CONTRACT §4.
pub fn message_id_conflict(message_id: &str) -> Rejection {
    Rejection::new(
        ErrorCode::MessageIdConflict,
        format!("message_id \"{message_id}\" was already used for a different command"),
    )
}

fn matches(stored: &StoredReply, fingerprint: &Fingerprint) -> bool {
    stored.fingerprint.as_deref() == Some(fingerprint.as_slice())
}

/// Plans a batch. `new_id` gives each created ticket or token its id (random
/// UUID v4 in the worker; fixed in tests).
pub fn plan(
    inputs: &[Input<'_>],
    mut loaded: Loaded,
    settings: Params<'_>,
    mut new_id: impl FnMut() -> Uuid,
) -> Plan {
    let mut plan = Plan {
        steps: Vec::with_capacity(inputs.len()),
        records: Vec::new(),
    };
    // The first remembered command of this batch with each message_id.
    let mut first_with_id: HashMap<&str, (usize, Fingerprint)> = HashMap::new();
    let no_tenant = Tenant::default();
    for (index, input) in inputs.iter().enumerate() {
        if input.reply_to_refused {
            plan.steps.push(Step::ReplyToRefused);
            continue;
        }
        let command = match input.decoded {
            Err(r) => {
                plan.steps.push(Step::Malformed(r.clone()));
                continue;
            }
            Ok(c) => c,
        };
        let fingerprint = command.fingerprint();
        if let Some(mid) = input.message_id {
            if let Some((earlier, fp)) = first_with_id.get(mid) {
                plan.steps.push(if *fp == fingerprint {
                    Step::SameAs(*earlier)
                } else {
                    Step::Rejected(message_id_conflict(mid))
                });
                continue;
            }
            if let Some(stored) = loaded.processed.get(mid) {
                if matches(stored, &fingerprint) {
                    // Copies later in this batch answer like this one, and do
                    // not publish its pending events again.
                    first_with_id.insert(mid, (index, fingerprint));
                    plan.steps.push(Step::Stored(stored.clone()));
                } else {
                    plan.steps.push(Step::Rejected(message_id_conflict(mid)));
                }
                continue;
            }
        }
        let purpose = match command {
            Command::CreateVerificationToken(c) => Some(c.purpose.unwrap_or_default().as_str()),
            Command::CreateTicket(_) => None,
        };
        let email_key = purpose.map(|p| (command.profile_id().to_string(), p.to_string()));
        let profile = loaded.profiles.get(command.profile_id());
        let tenant = profile.map(|p| loaded.tenants.get(&p.tenant).unwrap_or(&no_tenant));
        let outcome = domain::decide(
            command,
            loaded.tokens.get(command.access_token_id()),
            profile.zip(tenant),
            domain::Context {
                now_ms: settings.now_ms,
                new_id: new_id(),
                default_verification_url: settings.default_verification_url,
                email_cooldown_secs: settings.email_cooldown_secs,
                last_email_ms: email_key
                    .as_ref()
                    .and_then(|k| loaded.last_emails.get(k).copied()),
            },
        );
        if !outcome.is_remembered() {
            let Outcome::Rejected(r) = outcome else {
                unreachable!("only rejections are not remembered")
            };
            plan.steps.push(Step::Rejected(r));
            continue;
        }
        let rendered = render::outcome(&outcome, input.message_id, input.trace);
        let rejected = match &outcome {
            Outcome::Rejected(r) => Some(r.code),
            _ => None,
        };
        let created = match outcome {
            Outcome::TicketCreated(t) => Created::Ticket(t),
            Outcome::VerificationTokenCreated(t, _) => Created::VerificationToken(t),
            Outcome::Rejected(_) => Created::Nothing,
        };
        // A later command of this batch for the same profile and purpose sees
        // this email, as it would after the commit.
        let email = match (&created, email_key, purpose) {
            (Created::VerificationToken(t), Some(key), Some(purpose))
                if settings.email_cooldown_secs > 0 =>
            {
                loaded.last_emails.insert(key, t.timestamp);
                Some(EmailClaim {
                    profile_id: t.profile_id.clone(),
                    purpose,
                    at_ms: t.timestamp,
                })
            }
            _ => None,
        };
        if let Some(mid) = input.message_id {
            first_with_id.insert(mid, (index, fingerprint));
        }
        plan.steps.push(Step::New {
            record: plan.records.len(),
            rejected,
        });
        plan.records.push(NewRecord {
            message_id: input.message_id.map(str::to_string),
            command: command.name().as_str(),
            fingerprint,
            reply: rendered.reply,
            created,
            email,
            events: rendered.events,
        });
    }
    plan
}

/// A message_id another transaction committed first whose record is gone by
/// the time it is read (swept meanwhile): worth a retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message_id {message_id:?} conflicted but its record is gone")]
pub struct RecordGone {
    pub message_id: String,
}

/// A record whose message_id another transaction committed first wrote nothing:
/// its command is answered from that transaction's record, if it was the same
/// command, else with 409. `stored` holds those records; one missing (swept
/// meanwhile) is an error worth a retry.
pub fn resolve_lost(
    plan: &mut Plan,
    lost: &HashSet<usize>,
    mut stored: HashMap<String, StoredReply>,
) -> Result<(), RecordGone> {
    for step in plan.steps.iter_mut() {
        let Step::New { record: r, .. } = *step else {
            continue;
        };
        if !lost.contains(&r) {
            continue;
        }
        let record = &plan.records[r];
        let mid = record.message_id.as_deref().unwrap_or_default();
        let Some(s) = stored.remove(mid) else {
            return Err(RecordGone {
                message_id: mid.to_string(),
            });
        };
        *step = if matches(&s, &record.fingerprint) {
            Step::Stored(s)
        } else {
            Step::Rejected(message_id_conflict(mid))
        };
    }
    Ok(())
}

impl Plan {
    /// Whether every decision it took from the loaded rows is a record the
    /// commit writes, and so checks those rows for: no command is rejected
    /// (a rejection writes nothing) nor answered from a stored reply.
    pub fn only_records(&self) -> bool {
        self.steps
            .iter()
            .all(|s| !matches!(s, Step::Rejected(_) | Step::Stored(_)))
    }

    /// The reply to step `i` (following `SameAs`); `None` for a command that
    /// is not answered.
    pub fn reply(&self, i: usize) -> Option<Reply> {
        match &self.steps[i] {
            Step::ReplyToRefused => None,
            Step::Malformed(r) | Step::Rejected(r) => Some(render::rejection(r)),
            Step::Stored(s) => Some(s.reply.clone()),
            Step::New { record, .. } => Some(self.records[*record].reply.clone()),
            Step::SameAs(j) => self.reply(*j),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::contract::{CreateTicket, CreateVerificationToken, Purpose};
    use crate::domain::{AccessToken, Profile, TenantPermission};
    use proptest::prelude::*;

    const NOW: i64 = 1_700_000_000_000;

    fn params() -> Params<'static> {
        Params {
            now_ms: NOW,
            default_verification_url: "https://example.com/verify",
            email_cooldown_secs: 60,
        }
    }

    /// Two tokens (`admin` for every tenant, `other` for one) and one enabled
    /// profile `p1`: what most plan and answer tests load.
    pub(in crate::pipeline) fn loaded() -> Loaded {
        let mut l = Loaded::default();
        for (id, tenant) in [("admin", "*"), ("other", "other")] {
            l.tokens.insert(
                id.into(),
                AccessToken {
                    application: "app".into(),
                    expires_on: None,
                    tenant_permissions: vec![TenantPermission {
                        tenant: tenant.into(),
                        allowed_actions: vec!["*".into()],
                    }],
                },
            );
        }
        l.profiles.insert(
            "p1".into(),
            Profile {
                id: "p1".into(),
                tenant: "default".into(),
                email: "a@example.com".into(),
                enabled: true,
                locale: None,
            },
        );
        l
    }

    fn ticket(token: &str) -> Result<Command, Rejection> {
        Ok(Command::CreateTicket(CreateTicket {
            access_token_id: token.into(),
            profile_id: "p1".into(),
        }))
    }

    fn email(token: &str, purpose: Option<Purpose>) -> Result<Command, Rejection> {
        Ok(Command::CreateVerificationToken(CreateVerificationToken {
            access_token_id: token.into(),
            id: "p1".into(),
            purpose,
            verification_url: None,
        }))
    }

    fn ids() -> impl FnMut() -> Uuid {
        let mut n = 0u128;
        move || {
            n += 1;
            Uuid::from_u128(n)
        }
    }

    fn trace() -> TraceHeaders {
        TraceHeaders {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        }
    }

    fn inputs<'a>(
        commands: &'a [(Result<Command, Rejection>, Option<&'a str>)],
        trace: &'a TraceHeaders,
    ) -> Vec<Input<'a>> {
        commands
            .iter()
            .map(|(c, m)| Input {
                decoded: c,
                message_id: *m,
                trace,
                reply_to_refused: false,
            })
            .collect()
    }

    fn run(commands: &[(Result<Command, Rejection>, Option<&str>)], l: Loaded) -> Plan {
        let trace = trace();
        plan(&inputs(commands, &trace), l, params(), ids())
    }

    fn new(record: usize) -> Step {
        Step::New {
            record,
            rejected: None,
        }
    }

    fn code(step: &Step) -> Option<ErrorCode> {
        match step {
            Step::Malformed(r) | Step::Rejected(r) => Some(r.code),
            _ => None,
        }
    }

    #[test]
    fn keys_are_loaded_once_and_never_for_a_malformed_command() {
        let malformed = Err(Rejection::malformed("bad"));
        let commands = [
            (ticket("b"), Some("m2")),
            (ticket("a"), Some("m1")),
            (ticket("b"), Some("m2")),
            (malformed, Some("m3")),
            (email("a", None), None),
        ];
        let trace = trace();
        let k = keys(&inputs(&commands, &trace));
        assert_eq!(k.access_token_ids, ["a", "b"]);
        assert_eq!(k.message_ids, ["m1", "m2"]);
        assert_eq!(k.profile_ids.len(), 1, "{:?}", k.profile_ids);
    }

    #[test]
    fn a_plan_is_only_records_unless_it_rejects_or_repeats_a_stored_reply() {
        let malformed = Err(Rejection::malformed("bad"));
        let written = run(
            &[
                (ticket("admin"), Some("m")),
                (ticket("admin"), Some("m")),
                (malformed, None),
            ],
            loaded(),
        );
        assert!(written.only_records(), "{:?}", written.steps);
        let unknown_token = run(
            &[(ticket("admin"), None), (ticket("nobody"), None)],
            loaded(),
        );
        assert!(!unknown_token.only_records());
        let mut remembered = loaded();
        let stored = StoredReply {
            command: "create-ticket".into(),
            reply: Reply {
                status: 200,
                body: "{}".into(),
            },
            fingerprint: Some(ticket("admin").unwrap().fingerprint().to_vec()),
            pending_events: vec![],
        };
        remembered.processed.insert("m".into(), stored);
        let repeat = run(&[(ticket("admin"), Some("m"))], remembered);
        assert!(matches!(repeat.steps[0], Step::Stored(_)));
        assert!(!repeat.only_records());
    }

    #[test]
    fn a_refused_reply_to_is_neither_loaded_nor_planned_and_events_carry_the_trace() {
        let commands = [
            (ticket("admin"), Some("m1")),
            (email("other", None), Some("m2")),
        ];
        let trace = trace();
        let mut inputs = inputs(&commands, &trace);
        inputs[1].reply_to_refused = true;
        let k = keys(&inputs);
        assert_eq!(k.access_token_ids, ["admin"]);
        assert_eq!(k.message_ids, ["m1"]);
        let p = plan(&inputs, loaded(), params(), ids());
        assert_eq!(p.steps, vec![new(0), Step::ReplyToRefused]);
        assert_eq!(p.reply(1), None, "no reply at all");
        let e = &p.records[0].events[0];
        assert_eq!(e.traceparent.as_deref(), Some(trace.traceparent.as_str()));
        assert_eq!(e.tracestate, trace.tracestate);
    }

    #[test]
    fn a_repeat_in_the_batch_is_answered_like_the_first() {
        let p = run(
            &[(ticket("admin"), Some("m")), (ticket("admin"), Some("m"))],
            loaded(),
        );
        assert_eq!(p.steps, vec![new(0), Step::SameAs(0)]);
        assert_eq!(p.records.len(), 1);
        assert_eq!(p.reply(1), p.reply(0));
    }

    #[test]
    fn a_reused_message_id_with_another_token_gets_409_not_the_ticket() {
        let p = run(
            &[(ticket("admin"), Some("m")), (ticket("other"), Some("m"))],
            loaded(),
        );
        assert_eq!(p.steps[0], new(0));
        assert_eq!(code(&p.steps[1]), Some(ErrorCode::MessageIdConflict));
        let Reply { status, body } = p.reply(1).unwrap();
        assert_eq!(status, 409);
        assert_eq!(
            body,
            r#"{"errorCode":"MESSAGE_ID_CONFLICT","message":"message_id \"m\" was already used for a different command"}"#
        );
    }

    #[test]
    fn a_stored_reply_goes_only_to_the_same_command() {
        let first = run(&[(ticket("admin"), Some("m"))], loaded());
        let rec = &first.records[0];
        let stored = StoredReply {
            command: rec.command.into(),
            reply: rec.reply.clone(),
            fingerprint: Some(rec.fingerprint.to_vec()),
            pending_events: vec![],
        };
        let mut l = loaded();
        l.processed.insert("m".into(), stored.clone());
        let p = run(
            &[
                (ticket("admin"), Some("m")),
                (ticket("other"), Some("m")),
                (email("admin", None), Some("m")),
            ],
            l,
        );
        assert_eq!(p.steps[0], Step::Stored(stored));
        assert_eq!(code(&p.steps[1]), Some(ErrorCode::MessageIdConflict));
        assert_eq!(code(&p.steps[2]), Some(ErrorCode::MessageIdConflict));
        assert!(p.records.is_empty());
        // A record from before fingerprints matches nobody.
        let mut l = loaded();
        l.processed.insert(
            "m".into(),
            StoredReply {
                fingerprint: None,
                ..first_stored(&first)
            },
        );
        let p = run(&[(ticket("admin"), Some("m"))], l);
        assert_eq!(code(&p.steps[0]), Some(ErrorCode::MessageIdConflict));
    }

    fn first_stored(p: &Plan) -> StoredReply {
        let rec = &p.records[0];
        StoredReply {
            command: rec.command.into(),
            reply: rec.reply.clone(),
            fingerprint: Some(rec.fingerprint.to_vec()),
            pending_events: vec![],
        }
    }

    #[test]
    fn unknown_tokens_are_refused_and_not_remembered() {
        let p = run(
            &[(ticket("nope"), Some("m")), (ticket("admin"), Some("m"))],
            loaded(),
        );
        assert_eq!(code(&p.steps[0]), Some(ErrorCode::NoSuchAccessTokenId));
        assert_eq!(p.steps[1], new(0), "decided again, on its own");
        assert_eq!(p.records.len(), 1);
    }

    #[test]
    fn the_cooldown_holds_within_a_batch_and_per_purpose() {
        let p = run(
            &[
                (email("admin", None), Some("a")),
                (email("admin", Some(Purpose::VerifyAccount)), Some("b")),
                (email("admin", Some(Purpose::ResetPassword)), Some("c")),
                (email("admin", None), None),
            ],
            loaded(),
        );
        assert_eq!(p.steps[0], new(0));
        assert_eq!(code(&p.steps[1]), Some(ErrorCode::TooManyRequests));
        assert_eq!(p.steps[2], new(1));
        assert_eq!(code(&p.steps[3]), Some(ErrorCode::TooManyRequests));
        assert_eq!(
            p.records[0].email,
            Some(EmailClaim {
                profile_id: "p1".into(),
                purpose: "verify-account",
                at_ms: NOW
            })
        );
        assert_eq!(
            p.records[1].email.as_ref().unwrap().purpose,
            "reset-password"
        );
        let mut l = loaded();
        l.last_emails
            .insert(("p1".into(), "verify-account".into()), NOW - 10_000);
        let p = run(&[(email("admin", None), Some("a"))], l);
        assert_eq!(code(&p.steps[0]), Some(ErrorCode::TooManyRequests));
    }

    #[test]
    fn lost_races_resolve_by_fingerprint() {
        let mut p = run(
            &[(ticket("admin"), Some("m")), (ticket("admin"), Some("n"))],
            loaded(),
        );
        let mine = first_stored(&p);
        let other = StoredReply {
            fingerprint: Some(vec![0; 32]),
            ..mine.clone()
        };
        let stored = HashMap::from([("m".to_string(), mine.clone()), ("n".to_string(), other)]);
        resolve_lost(&mut p, &HashSet::from([0, 1]), stored).unwrap();
        assert_eq!(p.steps[0], Step::Stored(mine));
        assert_eq!(code(&p.steps[1]), Some(ErrorCode::MessageIdConflict));
        let mut p = run(&[(ticket("admin"), Some("m"))], loaded());
        assert!(resolve_lost(&mut p, &HashSet::from([0]), HashMap::new()).is_err());
    }

    fn any_command() -> impl Strategy<Value = Result<Command, Rejection>> {
        let token = prop_oneof![Just("admin"), Just("other"), Just("nope")];
        (token, any::<bool>(), any::<bool>()).prop_map(|(t, is_ticket, reset)| {
            if is_ticket {
                ticket(t)
            } else {
                email(t, reset.then_some(Purpose::ResetPassword))
            }
        })
    }

    proptest! {
        /// A repeated message_id never yields another fingerprint's reply: every
        /// command answered from a record (stored, or an earlier one of the batch)
        /// has the fingerprint of the command that made it.
        #[test]
        fn a_repeated_message_id_never_yields_another_fingerprints_reply(
            batch in proptest::collection::vec((any_command(), 0..3u8), 1..12),
            stored_fp_of in proptest::option::of(any_command()),
        ) {
            let mids = ["m0", "m1", "m2"];
            let commands: Vec<(Result<Command, Rejection>, Option<&str>)> = batch
                .iter()
                .map(|(c, m)| (c.clone(), Some(mids[*m as usize])))
                .collect();
            let mut l = loaded();
            if let Some(Ok(c)) = &stored_fp_of {
                l.processed.insert("m0".into(), StoredReply {
                    command: c.name().as_str().into(),
                    reply: Reply { status: 200, body: "stored".into() },
                    fingerprint: Some(c.fingerprint().to_vec()),
                    pending_events: vec![],
                });
            }
            let p = run(&commands, l);
            for (i, step) in p.steps.iter().enumerate() {
                let fp = commands[i].0.as_ref().unwrap().fingerprint();
                match step {
                    Step::Stored(s) => prop_assert_eq!(s.fingerprint.as_deref(), Some(fp.as_slice())),
                    Step::SameAs(j) => {
                        prop_assert!(*j < i);
                        prop_assert_eq!(commands[*j].1, commands[i].1);
                        prop_assert_eq!(commands[*j].0.as_ref().unwrap().fingerprint(), fp);
                    }
                    Step::New { record, .. } => prop_assert_eq!(p.records[*record].fingerprint, fp),
                    Step::Rejected(_) | Step::Malformed(_) | Step::ReplyToRefused => {}
                }
            }
            // At most one record per message_id.
            let mut seen = HashSet::new();
            for r in &p.records {
                prop_assert!(seen.insert(r.message_id.clone()));
            }
        }
    }
}
