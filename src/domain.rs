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
    pub application: String,
    /// Epoch milliseconds; `None` never expires.
    pub expires_on: Option<i64>,
    pub tenant_permissions: Vec<TenantPermission>,
}

impl AccessToken {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        matches!(self.expires_on, Some(t) if t <= now_ms)
    }

    /// Crafter's `TenantPermissionResolver`: the first entry, in list order, that
    /// names the tenant or `*` decides; later entries are not consulted, so a
    /// specific entry placed first can narrow a `*` entry after it.
    pub fn allows(&self, tenant: &str, action: &str) -> bool {
        self.tenant_permissions
            .iter()
            .find(|p| p.covers_tenant(tenant))
            .is_some_and(|p| p.allows(action))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub id: String,
    pub tenant: String,
    pub email: String,
    pub enabled: bool,
    /// The profile's `locale` attribute, when it is one ([`locale`]).
    pub locale: Option<String>,
}

/// A profile's `locale` attribute as the email request may carry it: a
/// language tag's shape (`fr`, `fr-CA`, `zh-Hant-TW`), at most 35 characters;
/// anything else is not passed on (a dispatcher looks templates up by it).
pub fn locale(attribute: &str) -> Option<String> {
    let mut parts = attribute.split('-');
    let language = parts.next()?;
    let ok = attribute.len() <= 35
        && (2..=3).contains(&language.len())
        && language.chars().all(|c| c.is_ascii_alphabetic())
        && parts
            .all(|p| (2..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
    ok.then(|| attribute.to_string())
}

/// What the domain needs of a tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenant {
    /// Hosts a caller-given `verificationUrl` may point at (`*.example.com`
    /// matches any subdomain); empty: only the host of the operator's
    /// `VERIFICATION_URL`.
    pub link_hosts: Vec<String>,
}

impl Tenant {
    /// Whether a caller's link may point at `host`. A tenant without
    /// `linkHosts` allows only the host of `default_base` (the operator's
    /// `VERIFICATION_URL`): otherwise any caller with `MANAGE_PROFILES` could
    /// have a victim's reset token emailed to the victim inside a link to a
    /// host of the caller's, one click from handing it over (CONTRACT §2).
    pub fn allows_link_host(&self, host: &str, default_base: &str) -> bool {
        if self.link_hosts.is_empty() {
            return link_host(default_base).is_some_and(|d| d.eq_ignore_ascii_case(host));
        }
        self.link_hosts.iter().any(|h| host_matches(h, host))
    }
}

/// Whether `email` is one address the dispatcher can send to and no more: a
/// bare `local@domain`, without a display name, a comment, a quoted local
/// part, a list or a route. `victim@example.com, attacker@example.net`, or
/// `"victim@example.com" <attacker@example.net>`, would otherwise carry a
/// reset link to a second inbox. Letters beyond ASCII are allowed (SMTPUTF8);
/// the characters that separate, quote or bracket addresses are not.
pub fn is_single_address(email: &str) -> bool {
    const ATEXT: &str = "!#$%&'*+-/=?^_`{|}~";
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let atom = |s: &str, extra: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || extra.contains(c))
    };
    let local_ok = local.len() <= 64 && local.split('.').all(|a| atom(a, ATEXT));
    let domain_ok = domain.len() <= 253
        && domain.split('.').all(|label| {
            label.chars().count() <= 63
                && atom(label, "-")
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    email.len() <= 254 && local_ok && domain_ok
}

/// `example.com` matches itself; `*.example.com` matches any subdomain of it
/// (at any depth) but not `example.com` itself. Case-insensitive.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => pattern == host,
    }
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
    /// The profile's locale, for the dispatcher's templates.
    pub locale: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    TicketCreated(Ticket),
    VerificationTokenCreated(VerificationToken, EmailRequest),
    Rejected(Rejection),
}

impl Outcome {
    /// Whether a repeat of the command (same `message_id`, same fingerprint) gets
    /// this outcome again from the idempotency record. Not for an unknown or
    /// expired token (CONTRACT §4: decided again; their messages also carry the
    /// whole access token ID, which is never stored), nor for the email cooldown,
    /// whose answer is "retry later".
    pub fn is_remembered(&self) -> bool {
        match self {
            Outcome::Rejected(r) => !matches!(
                r.code,
                ErrorCode::NoSuchAccessTokenId
                    | ErrorCode::AccessDenied
                    | ErrorCode::TooManyRequests
                    | ErrorCode::InvalidEmailAddress
            ),
            _ => true,
        }
    }
}

/// What `decide` needs besides the loaded rows.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub now_ms: i64,
    pub new_id: Uuid,
    /// Base of the email link when the command names none (trusted: the operator's).
    pub default_verification_url: &'a str,
    /// At most one email per profile and purpose this often; 0 turns it off.
    pub email_cooldown_secs: u64,
    /// When the last email for this command's profile and purpose was requested.
    pub last_email_ms: Option<i64>,
}

/// Applies the rules in Crafter Profile's order; the first that fails decides.
pub fn decide(
    command: &Command,
    token: Option<&AccessToken>,
    profile: Option<(&Profile, &Tenant)>,
    ctx: Context<'_>,
) -> Outcome {
    match check(command, token, profile, ctx) {
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
                        locale: profile.locale.clone(),
                    },
                )
            }
        },
    }
}

fn check<'p>(
    command: &Command,
    token: Option<&AccessToken>,
    profile: Option<(&'p Profile, &Tenant)>,
    ctx: Context<'_>,
) -> Result<&'p Profile, Rejection> {
    let token_id = command.access_token_id();
    let Some(token) = token else {
        return Err(Rejection::new(
            ErrorCode::NoSuchAccessTokenId,
            format!("No access token found for ID \"{token_id}\""),
        ));
    };
    if let Some(expired_on) = token.expires_on.filter(|_| token.is_expired(ctx.now_ms)) {
        return Err(Rejection::new(
            ErrorCode::AccessDenied,
            format!(
                "Access token \"{token_id}\" for application \"{}\" expired on {}",
                token.application,
                us_date(expired_on)
            ),
        ));
    }
    let profile_id = command.profile_id();
    let Some((profile, tenant)) = profile else {
        return Err(Rejection::new(
            ErrorCode::NoSuchProfile,
            format!("No profile with ID \"{profile_id}\" found"),
        ));
    };
    require_action(token, &profile.tenant, MANAGE_PROFILES)?;
    match command {
        Command::CreateTicket(_) => {
            require_action(token, &profile.tenant, MANAGE_TICKETS)?;
            // Disabled profiles get no tickets; verification tokens are still allowed,
            // because verifying the account is how a profile becomes enabled.
            if !profile.enabled {
                return Err(Rejection::new(
                    ErrorCode::DisabledProfile,
                    format!(
                        "Profile \"{profile_id}\" of tenant \"{}\" is disabled",
                        profile.tenant
                    ),
                ));
            }
        }
        Command::CreateVerificationToken(c) => {
            // After the permission check, so a caller without it learns nothing
            // about the tenant's hosts.
            if let Some(host) = c.verification_url.as_deref().and_then(link_host) {
                if !tenant.allows_link_host(&host, ctx.default_verification_url) {
                    return Err(Rejection::malformed(format!(
                        "verificationUrl host \"{host}\" is not allowed for tenant \"{}\"",
                        profile.tenant
                    )));
                }
            }
            // Before the cooldown: no email is claimed for an address that
            // cannot be sent to.
            if !is_single_address(&profile.email) {
                return Err(Rejection::new(
                    ErrorCode::InvalidEmailAddress,
                    format!(
                        "Invalid email address of profile \"{profile_id}\": it must be one address (name@domain), without a display name or a list"
                    ),
                ));
            }
            check_cooldown(profile_id, ctx)?;
        }
    }
    Ok(profile)
}

/// Rule 6: one email per profile and purpose per cooldown, so no caller can
/// flood a mailbox.
fn check_cooldown(profile_id: &str, ctx: Context<'_>) -> Result<(), Rejection> {
    let cooldown_ms = ctx.email_cooldown_secs.saturating_mul(1000) as i64;
    let Some(last) = ctx.last_email_ms.filter(|_| cooldown_ms > 0) else {
        return Ok(());
    };
    let wait_ms = last.saturating_add(cooldown_ms).saturating_sub(ctx.now_ms);
    if wait_ms <= 0 {
        return Ok(());
    }
    Err(Rejection::new(
        ErrorCode::TooManyRequests,
        format!(
            "A verification email was requested for profile \"{profile_id}\" less than {} s ago; retry in {} s",
            ctx.email_cooldown_secs,
            (wait_ms + 999) / 1000
        ),
    ))
}

fn require_action(token: &AccessToken, tenant: &str, action: &str) -> Result<(), Rejection> {
    if token.allows(tenant, action) {
        Ok(())
    } else {
        Err(Rejection::new(
            ErrorCode::ActionDenied,
            format!(
                "Current subject does not have permission to execute action \"{action}\" on tenant \"{tenant}\""
            ),
        ))
    }
}

/// The host of an already validated link base, lower-cased.
pub fn link_host(url: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()?
        .host_str()
        .map(str::to_ascii_lowercase)
}

/// Crafter's `createVerificationUrl`, byte for byte: the base, `&` if it contains
/// `?` anywhere (else `?`), then `tokenId=<id>`, at the very end, after a
/// `#fragment` too (single-page apps read it from their hash route).
pub fn verification_link(base: &str, token_id: Uuid) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}tokenId={token_id}")
}

/// `MM/dd/yyyy` of an epoch-milliseconds instant, in UTC (Crafter's format).
pub fn us_date(epoch_ms: i64) -> String {
    let (y, m, d) = civil_from_days(epoch_ms.div_euclid(86_400_000));
    format!("{m:02}/{d:02}/{y:04}")
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
            email_cooldown_secs: 60,
            last_email_ms: None,
        }
    }

    fn token(perms: &[(&str, &[&str])], expires_on: Option<i64>) -> AccessToken {
        AccessToken {
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
            locale: None,
        }
    }

    const NO_LINK_HOSTS: Tenant = Tenant { link_hosts: vec![] };

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

    fn decide_for(c: &Command, t: &AccessToken, p: &Profile) -> Outcome {
        decide(c, Some(t), Some((p, &NO_LINK_HOSTS)), ctx())
    }

    fn rejected(o: Outcome) -> Rejection {
        match o {
            Outcome::Rejected(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn creates_a_ticket() {
        let o = decide_for(&ticket_cmd(), &admin(), &profile(true));
        assert_eq!(
            o,
            Outcome::TicketCreated(Ticket {
                id: id(),
                tenant: "default".into(),
                profile_id: "p1".into(),
                last_request_time: NOW
            })
        );
        assert!(o.is_remembered());
    }

    #[test]
    fn missing_token_comes_first_and_is_not_remembered() {
        let o = decide(&ticket_cmd(), None, None, ctx());
        assert!(!o.is_remembered());
        let r = rejected(o);
        assert_eq!(r.code, ErrorCode::NoSuchAccessTokenId);
        assert_eq!(r.message, "No access token found for ID \"tok\"");
    }

    #[test]
    fn expired_token_is_denied_before_profile_lookup_with_crafters_message() {
        // 2023-11-14T22:13:19.999Z
        let t = token(&[("*", &["*"])], Some(NOW - 1));
        let o = decide(&ticket_cmd(), Some(&t), None, ctx());
        assert!(!o.is_remembered());
        let r = rejected(o);
        assert_eq!(r.code, ErrorCode::AccessDenied);
        assert_eq!(
            r.message,
            "Access token \"tok\" for application \"app\" expired on 11/14/2023"
        );
        let exactly_now = token(&[("*", &["*"])], Some(NOW));
        assert_eq!(
            rejected(decide(&ticket_cmd(), Some(&exactly_now), None, ctx())).code,
            ErrorCode::AccessDenied
        );
        let future = token(&[("*", &["*"])], Some(NOW + 1));
        assert!(matches!(
            decide_for(&ticket_cmd(), &future, &profile(true)),
            Outcome::TicketCreated(_)
        ));
    }

    #[test]
    fn us_dates_are_utc() {
        assert_eq!(us_date(0), "01/01/1970");
        assert_eq!(us_date(1_000_000_000_000), "09/09/2001");
        assert_eq!(us_date(951_782_400_000), "02/29/2000");
        assert_eq!(us_date(-1), "12/31/1969");
        assert_eq!(us_date(4_102_444_799_999), "12/31/2099");
    }

    #[test]
    fn missing_profile() {
        let o = decide(&ticket_cmd(), Some(&admin()), None, ctx());
        assert!(o.is_remembered());
        let r = rejected(o);
        assert_eq!(r.code, ErrorCode::NoSuchProfile);
        assert_eq!(r.status(), 404);
        assert_eq!(r.message, "No profile with ID \"p1\" found");
    }

    #[test]
    fn manage_profiles_is_required_on_the_profiles_tenant() {
        let other_tenant = token(&[("other", &["*"])], None);
        let r = rejected(decide_for(
            &vt_cmd(None, None),
            &other_tenant,
            &profile(true),
        ));
        assert_eq!(r.code, ErrorCode::ActionDenied);
        assert_eq!(
            r.message,
            "Current subject does not have permission to execute action \"MANAGE_PROFILES\" on tenant \"default\""
        );
        let tickets_only = token(&[("default", &[MANAGE_TICKETS])], None);
        let r = rejected(decide_for(&ticket_cmd(), &tickets_only, &profile(true)));
        assert!(
            r.message.contains("MANAGE_PROFILES"),
            "MANAGE_PROFILES is checked before MANAGE_TICKETS"
        );
    }

    #[test]
    fn tickets_also_need_manage_tickets() {
        let t = token(&[("default", &[MANAGE_PROFILES])], None);
        let r = rejected(decide_for(&ticket_cmd(), &t, &profile(true)));
        assert_eq!(r.code, ErrorCode::ActionDenied);
        assert!(r.message.contains("\"MANAGE_TICKETS\""));
        assert!(matches!(
            decide_for(&vt_cmd(None, None), &t, &profile(true)),
            Outcome::VerificationTokenCreated(..)
        ));
    }

    #[test]
    fn the_first_matching_permission_entry_decides() {
        // The example: a specific entry first narrows the `*` after it.
        let t = token(&[("default", &[]), ("*", &["*"])], None);
        let r = rejected(decide_for(&ticket_cmd(), &t, &profile(true)));
        assert_eq!(r.code, ErrorCode::ActionDenied);
        assert!(r.message.contains("MANAGE_PROFILES"));
        // Entries are not combined: MANAGE_TICKETS from a later `*` does not count.
        let t = token(
            &[("default", &[MANAGE_PROFILES]), ("*", &[MANAGE_TICKETS])],
            None,
        );
        let r = rejected(decide_for(&ticket_cmd(), &t, &profile(true)));
        assert!(r.message.contains("MANAGE_TICKETS"), "{}", r.message);
        // A `*` first decides for every tenant, even before a specific entry.
        let t = token(&[("*", &[MANAGE_PROFILES]), ("default", &["*"])], None);
        let r = rejected(decide_for(&ticket_cmd(), &t, &profile(true)));
        assert!(r.message.contains("MANAGE_TICKETS"), "{}", r.message);
        // An entry for another tenant is skipped, not decisive.
        let t = token(&[("other", &[]), ("*", &["*"])], None);
        assert!(matches!(
            decide_for(&ticket_cmd(), &t, &profile(true)),
            Outcome::TicketCreated(_)
        ));
        let exact = token(&[("default", &[MANAGE_PROFILES, MANAGE_TICKETS])], None);
        assert!(matches!(
            decide_for(&ticket_cmd(), &exact, &profile(true)),
            Outcome::TicketCreated(_)
        ));
        assert!(!token(&[], None).allows("default", MANAGE_PROFILES));
    }

    #[test]
    fn disabled_profiles_get_no_tickets_but_do_get_verification_tokens() {
        let r = rejected(decide_for(&ticket_cmd(), &admin(), &profile(false)));
        assert_eq!(r.code, ErrorCode::DisabledProfile);
        assert_eq!(
            r.message,
            "Profile \"p1\" of tenant \"default\" is disabled"
        );
        assert!(matches!(
            decide_for(&vt_cmd(None, None), &admin(), &profile(false)),
            Outcome::VerificationTokenCreated(..)
        ));
    }

    #[test]
    fn disabled_is_checked_after_permissions() {
        let t = token(&[("default", &[MANAGE_PROFILES])], None);
        assert_eq!(
            rejected(decide_for(&ticket_cmd(), &t, &profile(false))).code,
            ErrorCode::ActionDenied
        );
    }

    #[test]
    fn verification_token_carries_the_email_request() {
        let o = decide_for(
            &vt_cmd(
                Some(Purpose::ResetPassword),
                Some("https://default.test/reset?lang=en"),
            ),
            &admin(),
            &profile(false),
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
            format!("https://default.test/reset?lang=en&tokenId={}", id())
        );
        let o = decide_for(&vt_cmd(None, None), &admin(), &profile(true));
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
    fn link_rule_is_crafters_concatenation() {
        let t = id();
        for (base, link) in [
            (
                "https://e.com/verify",
                format!("https://e.com/verify?tokenId={t}"),
            ),
            (
                "https://e.com/v?a=1",
                format!("https://e.com/v?a=1&tokenId={t}"),
            ),
            ("https://e.com/v?", format!("https://e.com/v?&tokenId={t}")),
            (
                "https://e.com/v?a=1&",
                format!("https://e.com/v?a=1&&tokenId={t}"),
            ),
            (
                "https://e.com/#/v",
                format!("https://e.com/#/v?tokenId={t}"),
            ),
            (
                "https://e.com/v?a#f",
                format!("https://e.com/v?a#f&tokenId={t}"),
            ),
            (
                "https://e.com/#/v?x=1",
                format!("https://e.com/#/v?x=1&tokenId={t}"),
            ),
        ] {
            assert_eq!(verification_link(base, t), link, "{base}");
        }
    }

    #[test]
    fn a_tenant_without_link_hosts_allows_only_the_default_links_host() {
        let p = profile(true);
        let with = |url: &str| {
            decide(
                &vt_cmd(None, Some(url)),
                Some(&admin()),
                Some((&p, &NO_LINK_HOSTS)),
                ctx(),
            )
        };
        for ok in ["https://default.test/other?x=1", "https://DEFAULT.test/v"] {
            assert!(
                matches!(with(ok), Outcome::VerificationTokenCreated(..)),
                "{ok}"
            );
        }
        for bad in [
            "https://evil.test/verify",
            "https://a.default.test/verify",
            "https://default.test.evil.test/verify",
        ] {
            let r = rejected(with(bad));
            assert_eq!(r.code, ErrorCode::ParamDeserializationError, "{bad}");
            assert!(
                r.message.ends_with("is not allowed for tenant \"default\""),
                "{}",
                r.message
            );
        }
    }

    #[test]
    fn a_locale_is_passed_on_only_when_it_looks_like_one() {
        for ok in ["fr", "fr-CA", "zh-Hant-TW", "en-US", "gsw"] {
            assert_eq!(locale(ok).as_deref(), Some(ok));
        }
        for bad in [
            "",
            "f",
            "french",
            "../etc",
            "fr_CA",
            "fr-",
            "fr-CA/x",
            "en-US-toolongsubtag",
        ] {
            assert_eq!(locale(bad), None, "{bad:?}");
        }
        let p = Profile {
            locale: locale("de-AT"),
            ..profile(true)
        };
        let o = decide(
            &vt_cmd(None, None),
            Some(&admin()),
            Some((&p, &NO_LINK_HOSTS)),
            ctx(),
        );
        let Outcome::VerificationTokenCreated(_, email) = o else {
            panic!("{o:?}")
        };
        assert_eq!(email.locale.as_deref(), Some("de-AT"));
    }

    #[test]
    fn one_address_and_no_more() {
        for ok in [
            "john.doe@example.com",
            "a@b",
            "o'brien+tag@mail.example.co.uk",
            "jörg@bücher.example",
            "x_y-z@sub-domain.example.com",
        ] {
            assert!(is_single_address(ok), "{ok}");
        }
        for bad in [
            "victim@example.com, attacker@example.net",
            "victim@example.com,attacker@example.net",
            "victim@example.com;attacker@example.net",
            "\"victim@example.com\" <attacker@example.net>",
            "Victim <victim@example.com>",
            "victim@example.com <attacker@example.net>",
            "victim@example.com (attacker@example.net)",
            "victim@example.com attacker@example.net",
            "\"quoted local\"@example.com",
            "@example.com",
            "john@",
            "john",
            "john@@example.com",
            "john@a@example.com",
            ".john@example.com",
            "john.@example.com",
            "jo..hn@example.com",
            "john@-example.com",
            "john@example..com",
            "john@[127.0.0.1]",
            "john@example.com\r\nBcc: attacker@example.net",
            "john@exa mple.com",
            "",
        ] {
            assert!(!is_single_address(bad), "{bad:?}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(!is_single_address(&long_local));
    }

    #[test]
    fn a_profile_without_one_address_gets_no_email() {
        let mut p = profile(true);
        p.email = "victim@example.com, attacker@example.net".into();
        let o = decide(
            &vt_cmd(None, None),
            Some(&admin()),
            Some((&p, &NO_LINK_HOSTS)),
            ctx(),
        );
        assert!(
            !o.is_remembered(),
            "decided again once the profile is fixed"
        );
        let r = rejected(o);
        assert_eq!(r.code, ErrorCode::InvalidEmailAddress);
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.message,
            "Invalid email address of profile \"p1\": it must be one address (name@domain), without a display name or a list"
        );
        // After the permission check: a caller without it learns nothing.
        let no = token(&[("other", &["*"])], None);
        let o = decide(
            &vt_cmd(None, None),
            Some(&no),
            Some((&p, &NO_LINK_HOSTS)),
            ctx(),
        );
        assert_eq!(rejected(o).code, ErrorCode::ActionDenied);
        // A ticket sends no email.
        let o = decide(
            &ticket_cmd(),
            Some(&admin()),
            Some((&p, &NO_LINK_HOSTS)),
            ctx(),
        );
        assert!(matches!(o, Outcome::TicketCreated(_)));
    }

    #[test]
    fn link_hosts_are_checked_after_permissions() {
        let tenant = Tenant {
            link_hosts: vec!["example.com".into(), "*.example.com".into()],
        };
        let p = profile(true);
        let with = |url: &str, t: &AccessToken| {
            decide(
                &vt_cmd(None, Some(url)),
                Some(t),
                Some((&p, &tenant)),
                ctx(),
            )
        };
        for ok in [
            "https://example.com/v",
            "https://EXAMPLE.com/v",
            "https://a.example.com/v",
            "https://a.b.example.com/v",
        ] {
            assert!(
                matches!(with(ok, &admin()), Outcome::VerificationTokenCreated(..)),
                "{ok}"
            );
        }
        for bad in [
            "https://evil.test/v",
            "https://notexample.com/v",
            "https://example.com.evil.test/v",
        ] {
            let o = with(bad, &admin());
            assert!(o.is_remembered(), "a business rejection");
            let r = rejected(o);
            assert_eq!(r.code, ErrorCode::ParamDeserializationError, "{bad}");
            assert_eq!(r.status(), 400);
            assert!(
                r.message.starts_with("verificationUrl host \""),
                "{}",
                r.message
            );
            assert!(r.message.ends_with("is not allowed for tenant \"default\""));
        }
        assert_eq!(
            rejected(with("https://evil.test/v", &admin())).message,
            "verificationUrl host \"evil.test\" is not allowed for tenant \"default\""
        );
        // Without permission the caller learns nothing about the hosts.
        let no = token(&[("other", &["*"])], None);
        assert_eq!(
            rejected(with("https://evil.test/v", &no)).code,
            ErrorCode::ActionDenied
        );
        // The operator's default is trusted.
        let o = decide(
            &vt_cmd(None, None),
            Some(&admin()),
            Some((&p, &tenant)),
            ctx(),
        );
        assert!(matches!(o, Outcome::VerificationTokenCreated(..)));
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
        assert!(!host_matches("*.example.com", "aexample.com"));
        assert!(host_matches("Example.COM", "example.com"));
        assert!(!host_matches("example.com", "a.example.com"));
    }

    #[test]
    fn email_cooldown() {
        let p = profile(true);
        let at = |last: Option<i64>, secs: u64| {
            decide(
                &vt_cmd(None, None),
                Some(&admin()),
                Some((&p, &NO_LINK_HOSTS)),
                Context {
                    last_email_ms: last,
                    email_cooldown_secs: secs,
                    ..ctx()
                },
            )
        };
        assert!(matches!(
            at(None, 60),
            Outcome::VerificationTokenCreated(..)
        ));
        let o = at(Some(NOW - 1_500), 60);
        assert!(!o.is_remembered());
        let r = rejected(o);
        assert_eq!(r.code, ErrorCode::TooManyRequests);
        assert_eq!(r.status(), 429);
        assert_eq!(
            r.message,
            "A verification email was requested for profile \"p1\" less than 60 s ago; retry in 59 s"
        );
        let r = rejected(at(Some(NOW - 59_999), 60));
        assert!(r.message.ends_with("retry in 1 s"), "{}", r.message);
        assert!(matches!(
            at(Some(NOW - 60_000), 60),
            Outcome::VerificationTokenCreated(..)
        ));
        assert!(
            matches!(at(Some(NOW), 0), Outcome::VerificationTokenCreated(..)),
            "0 turns it off"
        );
        // Permissions first: no cooldown answer to a caller who may not ask.
        let no = token(&[("other", &["*"])], None);
        let o = decide(
            &vt_cmd(None, None),
            Some(&no),
            Some((&p, &NO_LINK_HOSTS)),
            Context {
                last_email_ms: Some(NOW),
                ..ctx()
            },
        );
        assert_eq!(rejected(o).code, ErrorCode::ActionDenied);
    }
}
