//! Scraping a manager's `/metrics` in tests.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long [`Metrics::wait_for`] waits for a series to converge.
const CONVERGE: Duration = Duration::from_secs(60);
const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);

/// `GET /metrics` over a plain TCP connection; the body.
pub async fn scrape(addr: &str) -> String {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(SCRAPE_DEADLINE, fetch)
        .await
        .unwrap_or_else(|_| panic!("expected {addr}/metrics to answer within {SCRAPE_DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("expected to GET {addr}/metrics: {e}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("expected an HTTP response, got {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// The value of one series, written exactly as exported (`name{label="v",...}`).
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// [`value`], panicking with the scrape when the series is missing.
pub fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("series {series} missing from\n{text}"))
}

/// A manager's metrics endpoint.
pub struct Metrics {
    /// `host:port` of `--metrics-listen`.
    pub addr: String,
}

impl Metrics {
    /// The current value of `series`; panics when it is missing.
    pub async fn get(&self, series: &str) -> f64 {
        must(&scrape(&self.addr).await, series)
    }

    /// Polls until `series` has `want`; panics with the last scrape.
    pub async fn wait_for(&self, series: &str, want: f64) {
        let start = std::time::Instant::now();
        loop {
            let text = scrape(&self.addr).await;
            if value(&text, series) == Some(want) {
                return;
            }
            if start.elapsed() > CONVERGE {
                panic!(
                    "expected {series} to reach {want} within {CONVERGE:?}; last scrape:\n{text}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
