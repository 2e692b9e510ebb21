//! The admin listener (/metrics, /healthz, /readyz) as a scraper sees it:
//! HTTP/1.1 through reqwest, the exposition read by prometheus-parse.

use std::fmt;
use std::net::SocketAddr;

use prometheus_parse::{Scrape, Value};

use super::TestServer;

/// GET `path` on the admin listener at `addr`: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> reqwest::Result<(u16, String)> {
    let response = reqwest::get(format!("http://{addr}{path}")).await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// One scrape of /metrics.
pub struct Metrics {
    text: String,
    scrape: Scrape,
}

impl Metrics {
    pub fn parse(text: String) -> Self {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("lines of a string read without error");
        Self { text, scrape }
    }

    /// GET /metrics at `addr`, which must answer 200.
    pub async fn scrape(addr: SocketAddr) -> Self {
        let (status, text) = get(addr, "/metrics")
            .await
            .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
        assert_eq!(status, 200, "/metrics of {addr}: {text}");
        Self::parse(text)
    }

    /// The sum of the samples named `name` that carry every label of
    /// `labels`: `sum("ingest_readings_total", &[("outcome", "committed")])`.
    /// 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// [`Self::sum`], `None` when no sample matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                Value::Histogram(_) | Value::Summary(_) => None,
            })
            .reduce(|a, b| a + b)
    }
}

/// The exposition as scraped, for assertion messages.
impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TestServer {
    /// GET on the admin listener: (status, body).
    pub async fn admin(&self, path: &str) -> (u16, String) {
        get(self.admin_addr, path).await.unwrap()
    }

    /// A scrape of the admin listener's /metrics.
    pub async fn metrics(&self) -> Metrics {
        Metrics::scrape(self.admin_addr).await
    }
}
