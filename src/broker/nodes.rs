//! The broker nodes `AMQP_URL` lists (a cluster: several URLs, comma-separated,
//! one vhost and one user) and the order a connection tries them in.

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::Connection;

/// One or more nodes of one broker (cluster), in the order given.
#[derive(Debug, Clone)]
pub struct Nodes {
    uris: Vec<AMQPUri>,
}

/// Why `AMQP_URL` cannot be used (the caller names the setting).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodesError {
    #[error("no URL given")]
    Empty,
    #[error("URL {index} is not a URL: {problem}")]
    Invalid { index: usize, problem: String },
    #[error(
        "URL {index} uses another vhost or user than the first; the nodes of one \
         cluster share both"
    )]
    Mixed { index: usize },
}

/// The URLs of a comma-separated list. A comma splits only where the next URL
/// starts (`,amqp://` or `,amqps://`), so a comma inside a password or a query
/// stays where it is.
pub fn split_urls(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in text.match_indices(',') {
        let rest = &text[i + 1..];
        let next = rest.trim_start();
        if next.starts_with("amqp://") || next.starts_with("amqps://") {
            out.push(text[start..i].trim());
            start = i + 1;
        }
    }
    out.push(text[start..].trim());
    out
}

impl Nodes {
    /// Parses the list; `defaults` fills in what each URL leaves unset
    /// (heartbeat, connection timeout).
    pub fn parse(text: &str, defaults: impl Fn(&mut AMQPUri)) -> Result<Nodes, NodesError> {
        let mut uris: Vec<AMQPUri> = Vec::new();
        for (i, part) in split_urls(text).into_iter().enumerate() {
            let index = i + 1;
            if part.is_empty() {
                return Err(if text.trim().is_empty() {
                    NodesError::Empty
                } else {
                    NodesError::Invalid {
                        index,
                        problem: "empty".into(),
                    }
                });
            }
            let mut uri: AMQPUri = part
                .parse()
                .map_err(|problem: String| NodesError::Invalid { index, problem })?;
            defaults(&mut uri);
            if let Some(first) = uris.first() {
                if first.vhost != uri.vhost || first.authority.userinfo != uri.authority.userinfo {
                    return Err(NodesError::Mixed { index });
                }
            }
            uris.push(uri);
        }
        Ok(Nodes { uris })
    }

    pub fn len(&self) -> usize {
        self.uris.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uris.is_empty()
    }

    /// The first node's URL, for tools that talk to one node only.
    pub fn first(&self) -> &AMQPUri {
        &self.uris[0]
    }

    /// `host:port` of node `i`, for logs and errors (never the credentials).
    pub fn at(&self, i: usize) -> String {
        let a = &self.uris[i % self.uris.len()].authority;
        format!("{}:{}", a.host, a.port)
    }

    /// Every node's `host:port`, comma-separated.
    pub fn all(&self) -> String {
        (0..self.len())
            .map(|i| self.at(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node to start from, chosen at random so that the workers of one
    /// deployment spread over the cluster instead of all loading the first node.
    pub fn random_start(&self) -> usize {
        fastrand::usize(..self.len())
    }

    /// Connects to the first node, from `start` on in list order, that accepts;
    /// returns the connection and that node's index, or, once every node has
    /// refused, where it tried and the last node's error.
    pub async fn connect(
        &self,
        tls: &OwnedTLSConfig,
        start: usize,
    ) -> Result<(Connection, usize), (String, lapin::Error)> {
        let mut last = None;
        for i in try_order(self.len(), start) {
            match super::connect(&self.uris[i], tls).await {
                Ok(c) => return Ok((c, i)),
                Err(e) => {
                    if self.len() > 1 {
                        tracing::debug!(broker = %self.at(i), error = %super::describe(&e), "node unreachable; trying the next");
                    }
                    last = Some((self.at(i), e));
                }
            }
        }
        let (at, e) = last.expect("at least one node");
        let at = if self.len() > 1 {
            format!("any of {} (last: {at})", self.all())
        } else {
            at
        };
        Err((at, e))
    }
}

/// Node indices from `start` on, wrapping, each once.
pub fn try_order(len: usize, start: usize) -> impl Iterator<Item = usize> {
    (0..len).map(move |k| (start + k) % len.max(1))
}

/// The broker's nodes from the operator's address: one URL, or several
/// comma-separated (one cluster's nodes, sharing vhost and user), each with the
/// heartbeat and connection timeout it does not set itself.
pub fn nodes(
    address: &crate::config::BrokerAddress,
    heartbeat_secs: u16,
) -> Result<Nodes, crate::config::ConfigError> {
    use secrecy::ExposeSecret;
    let nodes = Nodes::parse(address.amqp_url.expose_secret(), |uri| {
        uri.query.heartbeat.get_or_insert(heartbeat_secs);
        uri.query.connection_timeout.get_or_insert(10_000);
    })
    .map_err(|e| crate::config::ConfigError::new("AMQP_URL", e.to_string()))?;
    tls(address)?;
    Ok(nodes)
}

/// TLS settings for `amqps://`: the CA file's certificates, trusted besides
/// the system's.
pub fn tls(
    address: &crate::config::BrokerAddress,
) -> Result<lapin::tcp::OwnedTLSConfig, crate::config::ConfigError> {
    let cert_chain = match &address.amqp_ca_file {
        None => None,
        Some(ca) => Some(std::fs::read_to_string(ca).map_err(|e| {
            crate::config::ConfigError::new("AMQP_CA_FILE", format!("{}: {e}", ca.display()))
        })?),
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amqp_url_may_list_a_clusters_nodes() {
        let mut s = crate::config::Settings::from_env();
        s.broker.address.amqp_url = "amqp://u:p@a:5681/%2f,amqp://u:p@b:5682/%2f".into();
        let n = nodes(&s.broker.address, 10).unwrap();
        assert_eq!(n.all(), "a:5681,b:5682");
        s.broker.address.amqp_url = "amqp://u:p@a:5681/%2f,amqp://v:p@b:5682/%2f".into();
        let e = nodes(&s.broker.address, 10).unwrap_err();
        assert_eq!(e.setting, "AMQP_URL");
        assert!(
            e.problem.contains("same") || e.problem.contains("share"),
            "{e}"
        );
        s.broker.address.amqp_url = "http://nope".into();
        assert_eq!(
            nodes(&s.broker.address, 10).unwrap_err().setting,
            "AMQP_URL"
        );
    }

    #[test]
    fn commas_split_only_between_urls() {
        assert_eq!(
            split_urls("amqp://u:p@a:1/%2f, amqp://u:p@b:2/%2f,amqps://u:p@c:3/%2f"),
            [
                "amqp://u:p@a:1/%2f",
                "amqp://u:p@b:2/%2f",
                "amqps://u:p@c:3/%2f"
            ]
        );
        assert_eq!(split_urls("amqp://u:p,q@a/v"), ["amqp://u:p,q@a/v"]);
        assert_eq!(split_urls("amqp://a/v,"), ["amqp://a/v,"]);
    }

    #[test]
    fn a_list_shares_one_vhost_and_user() {
        let none = |_: &mut AMQPUri| {};
        let n = Nodes::parse("amqp://u:p@a:1/v,amqps://u:p@b:2/v", none).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n.all(), "a:1,b:2");
        assert_eq!(
            Nodes::parse("amqp://u:p@a:1/v,amqp://u:p@b:2/w", none).unwrap_err(),
            NodesError::Mixed { index: 2 }
        );
        assert_eq!(
            Nodes::parse("amqp://u:p@a:1/v,amqp://x:p@b:2/v", none).unwrap_err(),
            NodesError::Mixed { index: 2 }
        );
        assert!(matches!(
            Nodes::parse("amqp://a/v, amqp://", none),
            Err(NodesError::Invalid { index: 2, .. }) | Err(NodesError::Mixed { .. })
        ));
        assert_eq!(Nodes::parse("  ", none).unwrap_err(), NodesError::Empty);
    }

    #[test]
    fn defaults_fill_every_node() {
        let n = Nodes::parse("amqp://a/v,amqp://b/v?heartbeat=3", |u| {
            u.query.heartbeat.get_or_insert(10);
        })
        .unwrap();
        assert_eq!(n.uris[0].query.heartbeat, Some(10));
        assert_eq!(n.uris[1].query.heartbeat, Some(3));
    }

    #[test]
    fn every_node_is_tried_once_from_the_start() {
        assert_eq!(try_order(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(try_order(3, 5).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(try_order(1, 0).collect::<Vec<_>>(), [0]);
        let n = Nodes::parse("amqp://a/v,amqp://b/v,amqp://c/v", |_| {}).unwrap();
        for _ in 0..50 {
            assert!(n.random_start() < 3);
        }
    }
}
