//! Settings from flags and the environment, validated once at start-up.
//! Nothing else in the crate reads the environment.

use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_COMMAND_EXCHANGE: &str = "profile.commands";
pub const DEFAULT_DEAD_LETTER_QUEUE: &str = "profile.commands.dead";
pub const DEFAULT_BULK_EXCHANGE: &str = "profile.commands.bulk";
pub const DEFAULT_DATABASE_URL: &str =
    "postgres://profile_worker:profile_worker@127.0.0.1:5432/profile_worker";

/// Where Postgres is and how many connections to keep.
#[derive(Args, Clone, Debug)]
pub struct DatabaseSettings {
    /// PostgreSQL URL (postgres://user:password@host:port/database). A secret:
    /// its password never reaches a log or a Debug print.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true, hide_default_value = true)]
    pub database_url: SecretString,
    /// Connections in the pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub db_pool_size: u16,
    /// How long a query may wait for a free connection or a new one, in seconds.
    #[arg(long, env = "DB_TIMEOUT_SECS", default_value_t = 5)]
    pub db_timeout_secs: u64,
    /// Role `migrate` grants the worker's row rights to (the role `run` connects
    /// as, without DDL rights); empty: grant nothing.
    #[arg(long, env = "DATABASE_RUNTIME_ROLE", default_value = "")]
    pub runtime_role: String,
}

impl DatabaseSettings {
    /// The connection settings and the TLS wanted (`sslmode`, `sslrootcert`, read
    /// here because tokio-postgres knows only part of libpq's modes).
    pub fn validate(&self) -> Result<(tokio_postgres::Config, TlsSettings), ConfigError> {
        let bad = |m: String| ConfigError::new("DATABASE_URL", m);
        let text = self.database_url.expose_secret();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(bad("must be a postgres:// URL".into()));
        }
        let (base, query) = text.split_once('?').unwrap_or((text, ""));
        let mut mode = SslMode::Prefer;
        let mut root = None;
        let mut rest = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "sslmode" => mode = SslMode::parse(&v)?,
                "sslrootcert" => root = Some(v.into_owned()),
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(bad(format!("{k} (client certificates) is not supported")))
                }
                _ => {
                    rest.append_pair(&k, &v);
                }
            }
        }
        let rest = rest.finish();
        let url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{rest}")
        };
        let mut pg = url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| bad(format!("invalid URL: {e}")))?;
        pg.ssl_mode(mode.negotiation());
        let tls = TlsSettings {
            mode,
            root_cert: RootCert::resolve(root.as_deref()),
        };
        Ok((pg, tls))
    }

    pub fn db_timeout(&self) -> Duration {
        Duration::from_secs(self.db_timeout_secs.max(1))
    }
}

/// `DATABASE_URL`'s `sslmode` (libpq's names; what each means: `store::tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    format!("sslmode={other:?} is not supported (disable, prefer, require, verify-ca, verify-full)"),
                ))
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is attempted and whether it must succeed.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// Neither configured nor at libpq's default path.
    None,
    System,
    File(PathBuf),
}

impl RootCert {
    /// `sslrootcert` as given, else libpq's default `~/.postgresql/root.crt` when present.
    pub fn resolve(given: Option<&str>) -> Self {
        match given {
            Some("system") => RootCert::System,
            Some(path) => RootCert::File(PathBuf::from(path)),
            None => match std::env::var_os("HOME").map(PathBuf::from) {
                Some(home) if home.join(".postgresql/root.crt").is_file() => {
                    RootCert::File(home.join(".postgresql/root.crt"))
                }
                _ => RootCert::None,
            },
        }
    }
}

/// The TLS settings a `DATABASE_URL` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: RootCert,
}

/// How to reach RabbitMQ: all that the operator's tools and the worker share.
#[derive(Args, Clone, Debug)]
pub struct BrokerAddress {
    /// AMQP URL of the broker, or of each node of a cluster, comma-separated
    /// (same vhost and user); the worker starts from a random one and moves to
    /// another when it loses its node. A secret: its password never reaches a
    /// log or a Debug print.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: SecretString,
    /// PEM file of the certificate authorities an amqps:// broker's certificate
    /// must chain to (default: the system's).
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<std::path::PathBuf>,
}

/// Where RabbitMQ is and what the topology is called (CONTRACT §1).
#[derive(Args, Clone, Debug)]
pub struct BrokerSettings {
    #[command(flatten)]
    pub address: BrokerAddress,
    /// Direct exchange publishers send commands to.
    #[arg(long, env = "COMMAND_EXCHANGE", default_value = DEFAULT_COMMAND_EXCHANGE)]
    pub command_exchange: String,
    /// Quorum queue the worker consumes: the interactive lane, whose commands
    /// go first.
    #[arg(long, env = "COMMAND_QUEUE", default_value = "profile.commands")]
    pub command_queue: String,
    /// Direct exchange of the bulk lane (CONTRACT §1): batch provisioning and
    /// imports publish here, so that a login never waits behind them. The same
    /// commands, replies and idempotency as the command exchange.
    #[arg(long, env = "BULK_EXCHANGE", default_value = DEFAULT_BULK_EXCHANGE)]
    pub bulk_exchange: String,
    /// Quorum queue of the bulk lane, bound to BULK_EXCHANGE; the worker takes
    /// from it when no interactive command is in hand, and at least
    /// BULK_SHARE_PERCENT of what it processes when both lanes have work.
    #[arg(long, env = "BULK_QUEUE", default_value = "profile.commands.bulk")]
    pub bulk_queue: String,
    /// Most commands the bulk queue holds (x-max-length; 0: no limit). Past it,
    /// publishers' messages are refused (nack), not dropped.
    #[arg(long, env = "BULK_QUEUE_MAX_LENGTH", default_value_t = 1_000_000)]
    pub bulk_queue_max_length: u64,
    /// Most bytes of bodies the bulk queue holds (x-max-length-bytes; 0: no limit).
    #[arg(long, env = "BULK_QUEUE_MAX_BYTES", default_value_t = 1 << 30)]
    pub bulk_queue_max_bytes: u64,
    /// Unacknowledged bulk commands the broker may hand this worker at once,
    /// shared out between its bulk consumers. It bounds the bulk work in
    /// hand when an interactive command arrives (BENCHMARKS.md, "A login during a bulk import").
    #[arg(long, env = "BULK_PREFETCH", default_value_t = 250, value_parser = clap::value_parser!(u16).range(1..))]
    pub bulk_prefetch: u16,
    /// Dead-letter exchange of the command queue.
    #[arg(
        long,
        env = "DEAD_LETTER_EXCHANGE",
        default_value = "profile.commands.dlx"
    )]
    pub dead_letter_exchange: String,
    /// Queue holding dead letters.
    #[arg(long, env = "DEAD_LETTER_QUEUE", default_value = DEFAULT_DEAD_LETTER_QUEUE)]
    pub dead_letter_queue: String,
    /// Topic exchange for events any subscriber may read (`ticket.created`,
    /// `verification-token.created`); they carry no secret.
    #[arg(long, env = "EVENTS_EXCHANGE", default_value = "profile.events")]
    pub events_exchange: String,
    /// Direct exchange for `email.requested`, which carries a verification link:
    /// only the email dispatcher's queue is bound to it, and no other broker
    /// user may read it (docs/OPERATIONS.md, "Who may read what").
    #[arg(long, env = "EMAIL_EXCHANGE", default_value = "profile.email")]
    pub email_exchange: String,
    /// Quorum queue the email dispatcher consumes, declared and bound to the
    /// email exchange by the worker, so no request is published before it exists.
    #[arg(long, env = "EMAIL_QUEUE", default_value = "profile.email.dispatch")]
    pub email_queue: String,
    /// Most email requests the dispatch queue holds (x-max-length; 0: no limit).
    /// Past it, the worker's publications are refused and the events wait in
    /// the outbox, not dropped.
    #[arg(long, env = "EMAIL_QUEUE_MAX_LENGTH", default_value_t = 1_000_000)]
    pub email_queue_max_length: u64,
    /// Most bytes the dispatch queue holds (x-max-length-bytes; 0: no limit).
    #[arg(long, env = "EMAIL_QUEUE_MAX_BYTES", default_value_t = 1 << 30)]
    pub email_queue_max_bytes: u64,
    /// Deliveries of one email request before the broker dead-letters it to
    /// `<EMAIL_QUEUE>.dead` (through `<EMAIL_EXCHANGE>.dlx`): a request its
    /// dispatcher keeps rejecting or crashing on does not loop for ever.
    #[arg(long, env = "EMAIL_DELIVERY_LIMIT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub email_delivery_limit: u32,
    /// Deliveries before a command that keeps failing is dead-lettered (x-delivery-limit).
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_limit: u32,
    /// Unacknowledged commands the broker may hand this worker at once.
    #[arg(long, env = "PREFETCH", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// AMQP heartbeat in seconds, so a dead connection is noticed.
    #[arg(long, env = "AMQP_HEARTBEAT_SECS", default_value_t = 10)]
    pub heartbeat_secs: u16,
    /// Queue-name prefixes a command's reply_to may start with, besides
    /// amq.rabbitmq.reply-to (direct reply-to), comma-separated. The default
    /// allows server-named queues.
    #[arg(
        long,
        env = "REPLY_TO_PREFIXES",
        default_value = "amq.gen-",
        value_delimiter = ','
    )]
    pub reply_to_prefixes: Vec<String>,
    /// Most commands the command queue holds (x-max-length; 0: no limit). Past
    /// it, publishers' messages are refused (nack), not dropped.
    #[arg(long, env = "COMMAND_QUEUE_MAX_LENGTH", default_value_t = 1_000_000)]
    pub command_queue_max_length: u64,
    /// Most bytes of bodies the command queue holds (x-max-length-bytes; 0: no limit).
    #[arg(long, env = "COMMAND_QUEUE_MAX_BYTES", default_value_t = 1 << 30)]
    pub command_queue_max_bytes: u64,
    /// Most messages the dead-letter queue holds (0: no limit). Past it, dead
    /// letters wait in the command queue's dead-lettering instead.
    #[arg(long, env = "DEAD_LETTER_QUEUE_MAX_LENGTH", default_value_t = 100_000)]
    pub dead_letter_queue_max_length: u64,
    /// Deliveries the dead-letter queue allows a message (x-delivery-limit)
    /// before the broker drops it. Declared explicitly so it does not depend on
    /// the broker version (RabbitMQ 4.x defaults to 20; 3.x has none). The
    /// dead-letters tools never return what they read, so only a foreign
    /// consumer that keeps rejecting counts. 0: declare none (a queue declared
    /// by an earlier version of the worker, without the argument).
    #[arg(long, env = "DEAD_LETTER_DELIVERY_LIMIT", default_value_t = 1_000)]
    pub dead_letter_delivery_limit: u32,
    /// Most bytes the dead-letter queue holds (0: no limit).
    #[arg(long, env = "DEAD_LETTER_QUEUE_MAX_BYTES", default_value_t = 256 << 20)]
    pub dead_letter_queue_max_bytes: u64,
}

impl BrokerSettings {
    /// The email dispatch queue's dead-letter exchange: `<EMAIL_EXCHANGE>.dlx`.
    pub fn email_dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.email_exchange)
    }

    /// Where email requests that exhausted their deliveries wait for an
    /// operator: `<EMAIL_QUEUE>.dead`. They carry links, so only the
    /// dispatcher's and the operator's users may read it.
    pub fn email_dead_letter_queue(&self) -> String {
        format!("{}.dead", self.email_queue)
    }

    /// `<command exchange>.unrouted`: the command exchange's alternate
    /// exchange, so a command whose routing key names no command reaches the
    /// queue and is answered.
    pub fn unrouted_exchange(&self) -> String {
        format!("{}.unrouted", self.command_exchange)
    }

    /// `<bulk exchange>.unrouted`: the bulk exchange's alternate exchange.
    pub fn bulk_unrouted_exchange(&self) -> String {
        format!("{}.unrouted", self.bulk_exchange)
    }

    /// Checks every name and prefix (the address is the broker's to parse:
    /// `broker::nodes`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("COMMAND_EXCHANGE", &self.command_exchange),
            ("COMMAND_QUEUE", &self.command_queue),
            ("BULK_EXCHANGE", &self.bulk_exchange),
            ("BULK_QUEUE", &self.bulk_queue),
            ("DEAD_LETTER_EXCHANGE", &self.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
            ("EVENTS_EXCHANGE", &self.events_exchange),
            ("EMAIL_EXCHANGE", &self.email_exchange),
            ("EMAIL_QUEUE", &self.email_queue),
        ] {
            if value.is_empty() || value.len() > 255 {
                return Err(ConfigError::new(name, "must be 1 to 255 bytes"));
            }
            if value.starts_with("amq.") {
                return Err(ConfigError::new(
                    name,
                    "names starting with \"amq.\" are reserved by RabbitMQ",
                ));
            }
        }
        // Names made from those: a name over 255 bytes would be cut (or
        // refused by the broker) instead of declared as the operator wrote it.
        for (name, derived) in [
            ("COMMAND_EXCHANGE", self.unrouted_exchange()),
            ("BULK_EXCHANGE", self.bulk_unrouted_exchange()),
            ("EMAIL_EXCHANGE", self.email_dead_letter_exchange()),
            ("EMAIL_QUEUE", self.email_dead_letter_queue()),
        ] {
            if derived.len() > 255 {
                return Err(ConfigError::new(
                    name,
                    format!("too long: the name made from it, {derived:?}, is over 255 bytes"),
                ));
            }
        }
        // The email exchange is the trust boundary: on the events exchange, every
        // subscriber would read the verification links.
        if self.email_exchange == self.events_exchange {
            return Err(ConfigError::new(
                "EMAIL_EXCHANGE",
                "must differ from EVENTS_EXCHANGE: email.requested carries a secret that subscribers to events must not read",
            ));
        }
        // One queue per lane: a lane that shared a queue with another would not
        // be one.
        if self.bulk_queue == self.command_queue || self.bulk_exchange == self.command_exchange {
            return Err(ConfigError::new(
                "BULK_QUEUE",
                "BULK_QUEUE and BULK_EXCHANGE must differ from COMMAND_QUEUE and COMMAND_EXCHANGE",
            ));
        }
        if self.reply_to_prefixes.iter().any(|p| p.trim().is_empty()) {
            return Err(ConfigError::new(
                "REPLY_TO_PREFIXES",
                "an empty prefix would allow replies to any queue",
            ));
        }
        for p in &self.reply_to_prefixes {
            if [
                &self.command_queue,
                &self.bulk_queue,
                &self.dead_letter_queue,
                &self.email_queue,
            ]
            .iter()
            .any(|q| q.starts_with(p.as_str()))
            {
                return Err(ConfigError::new(
                    "REPLY_TO_PREFIXES",
                    format!("{p:?} would allow replies into the worker's own queues"),
                ));
            }
        }
        Ok(())
    }
}

/// How the worker processes commands.
#[derive(Args, Clone, Debug)]
pub struct WorkerSettings {
    /// Most commands handled in one database transaction.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 250, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// At most how many milliseconds a consumer whose batch is not full waits
    /// for more commands while another of the worker's batches is in the
    /// database (0: never; a batch is what has already arrived). It stops
    /// waiting as soon as none is, so a lone command never waits. A batch's
    /// cost is mostly per batch, and one formed meanwhile would queue behind
    /// the other for the CPU and the WAL flush anyway (BENCHMARKS.md, "Changes, measured").
    #[arg(long, env = "BATCH_WAIT_MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub batch_wait_ms: u64,
    /// How many access tokens, and how many profiles, the worker keeps as an
    /// earlier batch read them, so that a batch naming only those skips its
    /// load (one round trip and transaction of two). Each commit checks that
    /// the rows it was decided on are unchanged, so a revoked token or a
    /// disabled profile takes effect on the next batch all the same; a row is
    /// read again at least every minute. 0: every batch is loaded.
    #[arg(long, env = "KNOWN_ROWS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub known_rows: u32,
    /// The least share of the commands processed, in percent, that the bulk
    /// lane gets while interactive commands are in hand: interactive commands
    /// go first, but a steady interactive load never starves an import.
    #[arg(long, env = "BULK_SHARE_PERCENT", default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub bulk_share_percent: u8,

    /// Consumers (each with its own channel and batches) in this process; while one
    /// waits for Postgres another publishes. PREFETCH is shared out between them.
    #[arg(long, env = "CONSUMERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub consumers: u16,
    /// Base of the email link when a command gives no verificationUrl, and
    /// the one host a caller's verificationUrl may point at for a tenant
    /// without linkHosts. Required, without a default: a default would reach
    /// real users' inboxes as a link to nowhere. https, or http on a loopback
    /// host (a developer's machine).
    #[arg(long, env = "VERIFICATION_URL")]
    pub verification_url: Option<String>,
    /// At most one verification email per profile and purpose this often, in
    /// seconds (0 turns the cooldown off).
    #[arg(long, env = "EMAIL_COOLDOWN_SECS", default_value_t = 60)]
    pub email_cooldown_secs: u64,
    /// Tickets expire this many seconds after their last request time.
    #[arg(long, env = "TICKET_MAX_AGE_SECS", default_value_t = 900)]
    pub ticket_max_age_secs: u64,
    /// Verification tokens expire this many seconds after their timestamp.
    #[arg(long, env = "TOKEN_MAX_AGE_SECS", default_value_t = 86_400)]
    pub token_max_age_secs: u64,
    /// How long a message_id is remembered for idempotency, in seconds.
    #[arg(long, env = "IDEMPOTENCY_RETENTION_SECS", default_value_t = 7 * 86_400)]
    pub idempotency_retention_secs: u64,
    /// Seconds between expiry sweeps (0 disables the sweeper).
    #[arg(long, env = "SWEEP_INTERVAL_SECS", default_value_t = 60)]
    pub sweep_interval_secs: u64,
    /// Events not confirmed this many seconds after commit are re-published by the outbox relay.
    #[arg(long, env = "OUTBOX_GRACE_SECS", default_value_t = 15)]
    pub outbox_grace_secs: u64,
    /// On SIGTERM, how long to keep trying to finish held commands before leaving them to redelivery.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// First pause, in ms, before reconnecting to a lost broker; it doubles
    /// (with up to as much again of random jitter) up to BROKER_RETRY_MAX_MS.
    #[arg(long, env = "BROKER_RETRY_MIN_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub broker_retry_min_ms: u64,
    /// Longest pause, in ms, between reconnection attempts.
    #[arg(long, env = "BROKER_RETRY_MAX_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub broker_retry_max_ms: u64,
    /// First pause, in ms, before retrying a batch the database failed
    /// transiently; doubles, jittered, up to DB_RETRY_MAX_MS.
    #[arg(long, env = "DB_RETRY_MIN_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub db_retry_min_ms: u64,
    /// Longest pause, in ms, between attempts at a batch while the database is away.
    #[arg(long, env = "DB_RETRY_MAX_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub db_retry_max_ms: u64,
    /// First pause, in ms, before a command that failed for a reason of its own
    /// (neither its input nor an outage) goes back to the queue; doubles,
    /// jittered, per failed delivery up to POISON_RETRY_MAX_MS. DELIVERY_LIMIT
    /// bounds the attempts.
    #[arg(long, env = "POISON_RETRY_MIN_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub poison_retry_min_ms: u64,
    /// Longest pause, in ms, before such a command goes back to the queue.
    #[arg(long, env = "POISON_RETRY_MAX_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub poison_retry_max_ms: u64,
    /// Seconds between reads of the command and dead-letter queues' depths
    /// (the profile_worker_queue_messages gauge).
    #[arg(long, env = "QUEUE_DEPTH_POLL_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_depth_poll_secs: u64,
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz
    /// (`off` disables it; port 0 picks a free port and logs it).
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8742")]
    pub http_addr: String,
}

impl WorkerSettings {
    /// The broker reconnect's backoff.
    pub fn broker_retry(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::millis(self.broker_retry_min_ms, self.broker_retry_max_ms)
    }

    /// The database retry's backoff.
    pub fn db_retry(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::millis(self.db_retry_min_ms, self.db_retry_max_ms)
    }

    /// The pause before a poison command's redelivery.
    pub fn poison_retry(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::millis(self.poison_retry_min_ms, self.poison_retry_max_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, min, max) in [
            (
                "BROKER_RETRY_MAX_MS",
                self.broker_retry_min_ms,
                self.broker_retry_max_ms,
            ),
            (
                "DB_RETRY_MAX_MS",
                self.db_retry_min_ms,
                self.db_retry_max_ms,
            ),
            (
                "POISON_RETRY_MAX_MS",
                self.poison_retry_min_ms,
                self.poison_retry_max_ms,
            ),
        ] {
            if max < min {
                return Err(ConfigError::new(
                    name,
                    format!("{max} is below its _MIN_MS setting ({min})"),
                ));
            }
        }
        check_verification_url(self.verification_url.as_deref())?;
        self.http_addr().map(|_| ())
    }

    /// The base of a verification link when a command gives none (checked by
    /// [`WorkerSettings::validate`] before a worker runs).
    pub fn verification_url(&self) -> &str {
        self.verification_url.as_deref().unwrap_or_default()
    }

    /// The operations endpoint's address, `None` when it is turned off.
    pub fn http_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.http_addr.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        self.http_addr.parse().map(Some).map_err(|_| {
            ConfigError::new(
                "HTTP_ADDR",
                format!(
                    "{:?} is not an address like 127.0.0.1:8742 or [::]:8742 (or off)",
                    self.http_addr
                ),
            )
        })
    }
}

/// `VERIFICATION_URL`: set, a valid link base, and https unless its host is
/// this machine (plain http would carry every reset token in the clear).
fn check_verification_url(url: Option<&str>) -> Result<(), ConfigError> {
    const NAME: &str = "VERIFICATION_URL";
    let Some(url) = url.filter(|u| !u.is_empty()) else {
        return Err(ConfigError::new(
            NAME,
            "not set: the base of the link in every verification email, such as \
             https://app.example.com/verify (there is no default: docs/OPERATIONS.md)",
        ));
    };
    let host = crate::contract::command::check_verification_url(url).map_err(|e| {
        let why = e.message.trim_start_matches("Field \"verificationUrl\" ");
        ConfigError::new(NAME, why.to_string())
    })?;
    let parsed = url::Url::parse(url).map_err(|e| ConfigError::new(NAME, e.to_string()))?;
    if parsed.scheme() == "http" && !is_loopback(&parsed) {
        return Err(ConfigError::new(
            NAME,
            format!(
                "http is allowed only on a loopback host (a developer's machine), not {host:?}: \
                 the link carries a token that verifies an account or resets a password; use https"
            ),
        ));
    }
    Ok(())
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Everything `run` needs.
#[derive(Args, Clone, Debug)]
pub struct Settings {
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub broker: BrokerSettings,
    #[command(flatten)]
    pub worker: WorkerSettings,
}

impl Settings {
    /// Every environment variable `run` reads: its settings', the logging ones
    /// every subcommand reads (`LOG_FORMAT`, `RUST_LOG`) and the standard
    /// `OTEL_*` ones its span export honours (docs/OPERATIONS.md lists each).
    pub fn env_names() -> Vec<String> {
        use clap::Args;
        let cmd = Settings::augment_args(clap::Command::new("run"));
        let mut names: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        names.extend(
            [
                "LOG_FORMAT",
                "RUST_LOG",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_HEADERS",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "OTEL_SERVICE_NAME",
                "OTEL_RESOURCE_ATTRIBUTES",
                "OTEL_TRACES_SAMPLER",
                "OTEL_TRACES_SAMPLER_ARG",
                "OTEL_TRACES_EXPORTER",
                "OTEL_SDK_DISABLED",
            ]
            .map(String::from),
        );
        names
    }

    /// Defaults overridden by the environment, as `run` would see them with no flags.
    pub fn from_env() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            s: Settings,
        }
        Only::parse_from(["profile-worker"]).s
    }
}

/// A setting that cannot be used, named the way the operator set it.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            setting,
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_libpq_names_them() {
        for (s, m) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(SslMode::parse(s).unwrap(), m);
        }
        assert!(SslMode::parse("allow")
            .unwrap_err()
            .problem
            .contains("not supported"));
    }

    #[test]
    fn debug_hides_secrets() {
        let s = Settings::from_env();
        let mut s = s;
        s.database.database_url = "postgres://u:hunter2@h/db".into();
        s.broker.address.amqp_url = "amqp://u:hunter3@h/%2f".into();
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("hunter3"),
            "{dbg}"
        );
    }

    #[test]
    fn a_database_url_may_list_a_primary_and_its_standbys() {
        let mut s = Settings::from_env();
        s.database.database_url =
            "postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=disable"
                .into();
        let (pg, tls) = s.database.validate().unwrap();
        assert_eq!(pg.get_hosts().len(), 2);
        assert_eq!(pg.get_ports(), [5432, 5433]);
        assert_eq!(
            pg.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(tls.mode, SslMode::Disable);
    }

    /// What config checks itself (the broker's address is `broker::nodes`'s).
    fn check(s: &Settings) -> Result<(), ConfigError> {
        s.database.validate()?;
        s.broker.validate()?;
        s.worker.validate()
    }

    /// The defaults, and the one setting without a default.
    fn settings() -> Settings {
        let mut s = Settings::from_env();
        s.worker.verification_url = Some("https://app.example.com/verify".into());
        s
    }

    #[test]
    fn bad_urls_name_the_setting() {
        let mut s = settings();
        s.database.database_url = "mysql://x".into();
        assert_eq!(check(&s).err().unwrap().setting, "DATABASE_URL");
        let mut s = settings();
        s.worker.verification_url = Some("relative/path".into());
        assert_eq!(check(&s).err().unwrap().setting, "VERIFICATION_URL");
        let mut s = settings();
        s.worker.http_addr = "localhost".into();
        assert_eq!(check(&s).err().unwrap().setting, "HTTP_ADDR");
        s.worker.http_addr = "OFF".into();
        assert_eq!(s.worker.http_addr().unwrap(), None);
        let mut s = settings();
        s.worker.db_retry_max_ms = 50;
        assert_eq!(check(&s).err().unwrap().setting, "DB_RETRY_MAX_MS");
        let mut s = settings();
        s.worker.poison_retry_max_ms = 100;
        assert_eq!(check(&s).err().unwrap().setting, "POISON_RETRY_MAX_MS");
    }

    #[test]
    fn verification_url_has_no_default_and_plain_http_only_on_loopback() {
        let mut s = settings();
        s.worker.verification_url = None;
        let e = check(&s).err().unwrap();
        assert_eq!(e.setting, "VERIFICATION_URL");
        assert!(e.problem.starts_with("not set"), "{e}");
        for ok in [
            "https://app.example.com/verify",
            "http://localhost:8080/verify",
            "http://127.0.0.1/verify",
            "http://[::1]:8080/verify",
            "http://app.localhost/verify",
        ] {
            s.worker.verification_url = Some(ok.into());
            assert!(s.worker.validate().is_ok(), "{ok}");
        }
        for bad in [
            "http://app.example.com/verify",
            "http://10.0.0.1/verify",
            "http://localhost.example.com/verify",
        ] {
            s.worker.verification_url = Some(bad.into());
            let e = s.worker.validate().unwrap_err();
            assert_eq!(e.setting, "VERIFICATION_URL");
            assert!(e.problem.contains("use https"), "{bad}: {e}");
        }
        s.worker.verification_url = Some("ftp://example.com/x".into());
        assert_eq!(
            s.worker.validate().unwrap_err().to_string(),
            "VERIFICATION_URL: must be an absolute http or https URL"
        );
    }
}
