//! Why a benchmark run failed, by the part of the set-up that failed.

/// A failed run. The run removes what it made before it returns one.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag's value the run cannot use.
    #[error("{0}")]
    Usage(String),
    /// PostgreSQL: its URL, connecting, creating or dropping the run's
    /// database, migrating, seeding, counting rows.
    #[error("{context}")]
    Database {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// RabbitMQ: its URL, connecting, declaring, publishing, consuming.
    #[error("{context}")]
    Broker {
        context: String,
        #[source]
        source: lapin::Error,
    },
    /// The broker answered without an error but not as asked (a nack, a
    /// cancelled consumer).
    #[error("{0}")]
    Refused(String),
    /// A program this run starts: a worker process, `rabbitmqctl`.
    #[error("{0}")]
    Process(String),
    /// A file: a worker's log, the `--json` output.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// No reply came for `--stall-secs`.
    #[error("{0}")]
    Stalled(String),
    #[error("interrupted")]
    Interrupted,
    /// Every step worked, and the worker's answers or rows were wrong.
    #[error("the worker answered or stored something wrong:\n  {}", .0.join("\n  "))]
    Wrong(Vec<String>),
}

impl BenchError {
    pub fn database(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BenchError::Database {
            context: context.into(),
            source: Box::new(source),
        }
    }

    pub fn broker(context: impl Into<String>, source: lapin::Error) -> Self {
        BenchError::Broker {
            context: context.into(),
            source,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
