//! HTTP plumbing shared by both hubs: clients, retries with backoff, status → error mapping.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Client, RequestBuilder, Response, StatusCode};

use crate::StoreError;

/// Retry behaviour for transient failures (429, 5xx, dropped connections).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries per request (and per resumed download) before giving up; at least 1.
    pub max_attempts: u32,
    /// First backoff; doubles after each failure.
    pub base_delay: Duration,
    /// Cap for the backoff and for a server's `Retry-After`.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 8, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(60) }
    }
}

impl RetryPolicy {
    /// The delay before try number `attempt + 1` (attempt counts from 1), honouring `Retry-After`.
    pub(crate) fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.base_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        retry_after.unwrap_or(backoff).min(self.max_delay)
    }
}

/// Whether a status is worth retrying.
pub(crate) fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// `Retry-After` in seconds (the HTTP-date form is rare on hubs and treated as absent).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The clients a store uses.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    /// Follows redirects (reqwest drops `Authorization` when the host changes, as the LFS CDN needs).
    pub follow: Client,
    /// Does not follow redirects: for `HEAD` on `resolve` URLs, whose own headers carry the ETag.
    pub no_follow: Client,
    pub retry: RetryPolicy,
}

impl Http {
    pub fn new(retry: RetryPolicy) -> Result<Http, StoreError> {
        let build = |redirect| {
            Client::builder()
                .user_agent(concat!("llmd/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(15))
                // A stalled body counts as a dropped connection and is resumed.
                .read_timeout(Duration::from_secs(60))
                .redirect(redirect)
                .build()
                .map_err(|e| StoreError::network("(building the HTTP client)", e))
        };
        Ok(Http {
            follow: build(reqwest::redirect::Policy::limited(10))?,
            no_follow: build(reqwest::redirect::Policy::none())?,
            retry,
        })
    }

    /// Sends the request built by `build`, retrying transient failures. Returns the response
    /// when its status is a success, a redirect (for `no_follow`) or 416; `on_error` turns any
    /// other status into the hub-specific error.
    pub async fn send(
        &self,
        url: &str,
        build: impl Fn() -> RequestBuilder,
        on_error: impl Fn(StatusCode, &HeaderMap, String) -> StoreError,
    ) -> Result<Response, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= self.retry.max_attempts.max(1);
            match build().send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() || status.is_redirection() || status == StatusCode::RANGE_NOT_SATISFIABLE {
                        return Ok(resp);
                    }
                    if is_transient(status) && !last {
                        let wait = self.retry.delay(attempt, retry_after(resp.headers()));
                        tracing::warn!(url, %status, ?wait, attempt, "transient HTTP error, retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    let headers = resp.headers().clone();
                    let body = resp.text().await.unwrap_or_default();
                    return Err(on_error(status, &headers, body));
                }
                Err(e) if !last => {
                    let wait = self.retry.delay(attempt, None);
                    tracing::warn!(url, error = %e, ?wait, attempt, "request failed, retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(StoreError::network(url, e)),
            }
        }
    }
}

/// A short, single-line excerpt of an error body for messages.
pub(crate) fn excerpt(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 200 {
        format!("{}…", one_line.chars().take(200).collect::<String>())
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_honours_retry_after_up_to_the_cap() {
        let p =
            RetryPolicy { max_attempts: 5, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(2) };
        assert_eq!(p.delay(1, None), Duration::from_millis(100));
        assert_eq!(p.delay(3, None), Duration::from_millis(400));
        assert_eq!(p.delay(10, None), Duration::from_secs(2));
        assert_eq!(p.delay(1, Some(Duration::from_secs(1))), Duration::from_secs(1));
        assert_eq!(p.delay(1, Some(Duration::from_secs(100))), Duration::from_secs(2));
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }
}
