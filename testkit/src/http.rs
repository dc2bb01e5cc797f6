//! The operations endpoint from outside: GET, and Prometheus samples.

use std::time::Duration;

/// `name{a="x",b="y"} value` lines of a Prometheus text page, keyed by the name
/// and its labels in sorted order, so a test need not know the exporter's order.
pub fn samples(page: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let key = match key.split_once('{') {
            Some((name, labels)) => {
                let mut l: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                l.sort_unstable();
                format!("{name}{{{}}}", l.join(","))
            }
            None => key.to_string(),
        };
        if let Ok(v) = value.parse() {
            out.insert(key, v);
        }
    }
    out
}

/// `GET path` on a worker's operations endpoint: status and body, or `None`
/// when nothing answers.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    // One client per request: each test has its own runtime, and a pooled
    // connection must not outlive the runtime that made it.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client");
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Polls `path` until `want(status, body)` holds or `within` passes; returns the last answer.
pub async fn http_until(
    addr: &str,
    path: &str,
    within: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> Option<(u16, String)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = http_get(addr, path).await;
        if let Some((status, body)) = &answer {
            if want(*status, body) {
                return answer;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
