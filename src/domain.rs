//! The rules of CONTRACT §3, as a pure function of the command, the access token and
//! profile it names, the current time and a fresh id. No I/O, no clock, no RNG here:
//! the caller supplies them, which is what makes every rule unit-testable.

use crate::contract::{Command, ErrorCode, Purpose, Rejection};
use uuid::Uuid;

pub const MANAGE_PROFILES: &str = "MANAGE_PROFILES";
pub const MANAGE_TICKETS: &str = "MANAGE_TICKETS";
const WILDCARD: &str = "*";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPermission {
    pub tenant: String,
    pub allowed_actions: Vec<String>,
}

impl TenantPermission {
    fn covers_tenant(&self, tenant: &str) -> bool {
        self.tenant == tenant || self.tenant == WILDCARD
    }

    fn allows(&self, action: &str) -> bool {
        self.allowed_actions
            .iter()
            .any(|a| a == action || a == WILDCARD)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub id: String,
    pub application: String,
    /// Epoch milliseconds; `None` never expires.
    pub expires_on: Option<i64>,
    pub tenant_permissions: Vec<TenantPermission>,
}

impl AccessToken {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        matches!(self.expires_on, Some(t) if t <= now_ms)
    }

    /// Allowed when any permission that covers the tenant allows the action
    /// (a specific-tenant entry does not hide a `*` entry).
    pub fn allows(&self, tenant: &str, action: &str) -> bool {
        self.tenant_permissions
            .iter()
            .any(|p| p.covers_tenant(tenant) && p.allows(action))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub id: String,
    pub tenant: String,
    pub email: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub id: Uuid,
    pub tenant: String,
    pub profile_id: String,
    pub last_request_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationToken {
    pub id: Uuid,
    pub tenant: String,
    pub profile_id: String,
    pub timestamp: i64,
}

/// The email the dispatcher is asked to send for a new verification token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailRequest {
    pub to: String,
    pub purpose: Purpose,
    pub verification_link: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    TicketCreated(Ticket),
    VerificationTokenCreated(VerificationToken, EmailRequest),
    Rejected(Rejection),
}

/// What `decide` needs besides the loaded rows.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub now_ms: i64,
    pub new_id: Uuid,
    /// Base of the email link when the command names none.
    pub default_verification_url: &'a str,
}

/// Applies the rules in Crafter Profile's order; the first that fails decides.
pub fn decide(
    command: &Command,
    token: Option<&AccessToken>,
    profile: Option<&Profile>,
    ctx: Context<'_>,
) -> Outcome {
    match check(command, token, profile, ctx.now_ms) {
        Err(rejection) => Outcome::Rejected(rejection),
        Ok(profile) => match command {
            Command::CreateTicket(_) => Outcome::TicketCreated(Ticket {
                id: ctx.new_id,
                tenant: profile.tenant.clone(),
                profile_id: profile.id.clone(),
                last_request_time: ctx.now_ms,
            }),
            Command::CreateVerificationToken(c) => {
                let base = c
                    .verification_url
                    .as_deref()
                    .unwrap_or(ctx.default_verification_url);
                Outcome::VerificationTokenCreated(
                    VerificationToken {
                        id: ctx.new_id,
                        tenant: profile.tenant.clone(),
                        profile_id: profile.id.clone(),
                        timestamp: ctx.now_ms,
                    },
                    EmailRequest {
                        to: profile.email.clone(),
                        purpose: c.purpose.unwrap_or_default(),
                        verification_link: verification_link(base, ctx.new_id),
                    },
                )
            }
        },
    }
}

fn check<'p>(
    command: &Command,
    token: Option<&AccessToken>,
    profile: Option<&'p Profile>,
    now_ms: i64,
) -> Result<&'p Profile, Rejection> {
    let token_id = command.access_token_id();
    let Some(token) = token else {
        return Err(Rejection::new(
            ErrorCode::NoSuchAccessTokenId,
            format!("No access token found for ID \"{token_id}\""),
        ));
    };
    if token.is_expired(now_ms) {
        return Err(Rejection::new(
            ErrorCode::AccessDenied,
            format!(
                "Access token for application \"{}\" has expired",
                token.application
            ),
        ));
    }
    let profile_id = command.profile_id();
    let Some(profile) = profile else {
        return Err(Rejection::new(
            ErrorCode::NoSuchProfile,
            format!("No profile found for ID \"{profile_id}\""),
        ));
    };
    require_action(token, &profile.tenant, MANAGE_PROFILES)?;
    if let Command::CreateTicket(_) = command {
        require_action(token, &profile.tenant, MANAGE_TICKETS)?;
        // Disabled profiles get no tickets; verification tokens are still allowed,
        // because verifying the account is how a profile becomes enabled.
        if !profile.enabled {
            return Err(Rejection::new(
                ErrorCode::DisabledProfile,
                format!("Profile \"{profile_id}\" is disabled"),
            ));
        }
    }
    Ok(profile)
}

fn require_action(token: &AccessToken, tenant: &str, action: &str) -> Result<(), Rejection> {
    if token.allows(tenant, action) {
        Ok(())
    } else {
        Err(Rejection::new(
            ErrorCode::ActionDenied,
            format!(
                "Action {action} denied on tenant \"{tenant}\" for application \"{}\"",
                token.application
            ),
        ))
    }
}

/// Appends `tokenId=<id>` to the base: with `?`, or `&` when the base already has a
/// query. A `#fragment` stays at the end, where browsers expect it.
pub fn verification_link(base: &str, token_id: Uuid) -> String {
    let (before_fragment, fragment) = match base.find('#') {
        Some(i) => base.split_at(i),
        None => (base, ""),
    };
    let separator = match before_fragment.find('?') {
        None => "?",
        Some(i) if i + 1 == before_fragment.len() || before_fragment.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{before_fragment}{separator}tokenId={token_id}{fragment}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{CreateTicket, CreateVerificationToken};

    const NOW: i64 = 1_700_000_000_000;

    fn id() -> Uuid {
        "055d58c4-fabb-44da-96eb-261e24e1d0c9".parse().unwrap()
    }

    fn ctx() -> Context<'static> {
        Context {
            now_ms: NOW,
            new_id: id(),
            default_verification_url: "https://default.test/verify",
        }
    }

    fn token(perms: &[(&str, &[&str])], expires_on: Option<i64>) -> AccessToken {
        AccessToken {
            id: "tok".into(),
            application: "app".into(),
            expires_on,
            tenant_permissions: perms
                .iter()
                .map(|(t, a)| TenantPermission {
                    tenant: t.to_string(),
                    allowed_actions: a.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    fn admin() -> AccessToken {
        token(&[("*", &["*"])], None)
    }

    fn profile(enabled: bool) -> Profile {
        Profile {
            id: "p1".into(),
            tenant: "default".into(),
            email: "john@example.com".into(),
            enabled,
        }
    }

    fn ticket_cmd() -> Command {
        Command::CreateTicket(CreateTicket {
            access_token_id: "tok".into(),
            profile_id: "p1".into(),
        })
    }

    fn vt_cmd(purpose: Option<Purpose>, url: Option<&str>) -> Command {
        Command::CreateVerificationToken(CreateVerificationToken {
            access_token_id: "tok".into(),
            id: "p1".into(),
            purpose,
            verification_url: url.map(str::to_string),
        })
    }

    fn rejected(o: Outcome) -> Rejection {
        match o {
            Outcome::Rejected(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn creates_a_ticket() {
        let o = decide(&ticket_cmd(), Some(&admin()), Some(&profile(true)), ctx());
        assert_eq!(
            o,
            Outcome::TicketCreated(Ticket {
                id: id(),
                tenant: "default".into(),
                profile_id: "p1".into(),
                last_request_time: NOW
            })
        );
    }

    #[test]
    fn missing_token_comes_first() {
        let r = rejected(decide(&ticket_cmd(), None, None, ctx()));
        assert_eq!(r.code, ErrorCode::NoSuchAccessTokenId);
        assert_eq!(r.message, "No access token found for ID \"tok\"");
    }

    #[test]
    fn expired_token_is_denied_before_profile_lookup() {
        let t = token(&[("*", &["*"])], Some(NOW - 1));
        assert_eq!(
            rejected(decide(&ticket_cmd(), Some(&t), None, ctx())).code,
            ErrorCode::AccessDenied
        );
        let exactly_now = token(&[("*", &["*"])], Some(NOW));
        assert_eq!(
            rejected(decide(&ticket_cmd(), Some(&exactly_now), None, ctx())).code,
            ErrorCode::AccessDenied
        );
        let future = token(&[("*", &["*"])], Some(NOW + 1));
        assert!(matches!(
            decide(&ticket_cmd(), Some(&future), Some(&profile(true)), ctx()),
            Outcome::TicketCreated(_)
        ));
    }

    #[test]
    fn missing_profile() {
        let r = rejected(decide(&ticket_cmd(), Some(&admin()), None, ctx()));
        assert_eq!(r.code, ErrorCode::NoSuchProfile);
        assert_eq!(r.status(), 404);
        assert_eq!(r.message, "No profile found for ID \"p1\"");
    }

    #[test]
    fn manage_profiles_is_required_on_the_profiles_tenant() {
        let other_tenant = token(&[("other", &["*"])], None);
        let r = rejected(decide(
            &vt_cmd(None, None),
            Some(&other_tenant),
            Some(&profile(true)),
            ctx(),
        ));
        assert_eq!(r.code, ErrorCode::ActionDenied);
        assert!(r.message.contains("MANAGE_PROFILES"));
        let tickets_only = token(&[("default", &[MANAGE_TICKETS])], None);
        let r = rejected(decide(
            &ticket_cmd(),
            Some(&tickets_only),
            Some(&profile(true)),
            ctx(),
        ));
        assert!(
            r.message.contains("MANAGE_PROFILES"),
            "MANAGE_PROFILES is checked before MANAGE_TICKETS"
        );
    }

    #[test]
    fn tickets_also_need_manage_tickets() {
        let t = token(&[("default", &[MANAGE_PROFILES])], None);
        let r = rejected(decide(&ticket_cmd(), Some(&t), Some(&profile(true)), ctx()));
        assert_eq!(r.code, ErrorCode::ActionDenied);
        assert!(r.message.contains("MANAGE_TICKETS"));
        assert!(matches!(
            decide(&vt_cmd(None, None), Some(&t), Some(&profile(true)), ctx()),
            Outcome::VerificationTokenCreated(..)
        ));
    }

    #[test]
    fn permissions_combine_across_matching_entries() {
        let t = token(
            &[("default", &[MANAGE_PROFILES]), ("*", &[MANAGE_TICKETS])],
            None,
        );
        assert!(matches!(
            decide(&ticket_cmd(), Some(&t), Some(&profile(true)), ctx()),
            Outcome::TicketCreated(_)
        ));
        let exact = token(&[("default", &[MANAGE_PROFILES, MANAGE_TICKETS])], None);
        assert!(matches!(
            decide(&ticket_cmd(), Some(&exact), Some(&profile(true)), ctx()),
            Outcome::TicketCreated(_)
        ));
    }

    #[test]
    fn disabled_profiles_get_no_tickets_but_do_get_verification_tokens() {
        let r = rejected(decide(
            &ticket_cmd(),
            Some(&admin()),
            Some(&profile(false)),
            ctx(),
        ));
        assert_eq!(r.code, ErrorCode::DisabledProfile);
        assert!(matches!(
            decide(
                &vt_cmd(None, None),
                Some(&admin()),
                Some(&profile(false)),
                ctx()
            ),
            Outcome::VerificationTokenCreated(..)
        ));
    }

    #[test]
    fn disabled_is_checked_after_permissions() {
        let t = token(&[("default", &[MANAGE_PROFILES])], None);
        assert_eq!(
            rejected(decide(
                &ticket_cmd(),
                Some(&t),
                Some(&profile(false)),
                ctx()
            ))
            .code,
            ErrorCode::ActionDenied
        );
    }

    #[test]
    fn verification_token_carries_the_email_request() {
        let o = decide(
            &vt_cmd(
                Some(Purpose::ResetPassword),
                Some("https://x.test/reset?lang=en"),
            ),
            Some(&admin()),
            Some(&profile(false)),
            ctx(),
        );
        let Outcome::VerificationTokenCreated(tok, email) = o else {
            panic!()
        };
        assert_eq!(tok.id, id());
        assert_eq!(tok.timestamp, NOW);
        assert_eq!(email.to, "john@example.com");
        assert_eq!(email.purpose, Purpose::ResetPassword);
        assert_eq!(
            email.verification_link,
            format!("https://x.test/reset?lang=en&tokenId={}", id())
        );
        let o = decide(
            &vt_cmd(None, None),
            Some(&admin()),
            Some(&profile(true)),
            ctx(),
        );
        let Outcome::VerificationTokenCreated(_, email) = o else {
            panic!()
        };
        assert_eq!(email.purpose, Purpose::VerifyAccount);
        assert_eq!(
            email.verification_link,
            format!("https://default.test/verify?tokenId={}", id())
        );
    }

    #[test]
    fn link_rule() {
        let t = id();
        assert_eq!(
            verification_link("https://e.com/verify", t),
            format!("https://e.com/verify?tokenId={t}")
        );
        assert_eq!(
            verification_link("https://e.com/v?a=1", t),
            format!("https://e.com/v?a=1&tokenId={t}")
        );
        assert_eq!(
            verification_link("https://e.com/v?", t),
            format!("https://e.com/v?tokenId={t}")
        );
        assert_eq!(
            verification_link("https://e.com/v?a=1&", t),
            format!("https://e.com/v?a=1&tokenId={t}")
        );
        assert_eq!(
            verification_link("https://e.com/#/v", t),
            format!("https://e.com/?tokenId={t}#/v")
        );
        assert_eq!(
            verification_link("https://e.com/v?a#f", t),
            format!("https://e.com/v?a&tokenId={t}#f")
        );
    }
}
