//! Active health checks (`[upstreams.X] health`): each server is asked `GET path` every
//! `interval`; `unhealthy_after` failures in a row take it out of every balancing mode,
//! `healthy_after` successes in a row bring it back. A 2xx or 3xx answer within `timeout`
//! passes. Checks stop when the configuration generation that started them is replaced.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Server, Upstream};
use crate::config::HealthCheck;

/// Starts one checker task per server of `upstream`; they end when `stop` is cancelled.
pub fn spawn_checks(upstream: &Arc<Upstream>, check: &HealthCheck, stop: &CancellationToken) {
    for index in 0..upstream.servers.len() {
        let upstream = upstream.clone();
        let check = check.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut passes = 0u32;
            let mut failures = 0u32;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(check.interval) => {}
                }
                let server = &upstream.servers[index];
                let result = tokio::time::timeout(check.timeout, probe(&upstream, server, &check))
                    .await
                    .unwrap_or(Err(ProbeError::Timeout(check.timeout)));
                let healthy = server.is_healthy();
                match result {
                    Ok(()) => {
                        failures = 0;
                        passes = passes.saturating_add(1);
                        if !healthy && passes >= check.healthy_after {
                            server.set_healthy(true);
                            info!(upstream = %upstream.name, server = %server.label, "server is healthy again");
                        }
                    }
                    Err(reason) => {
                        passes = 0;
                        failures = failures.saturating_add(1);
                        if healthy && failures >= check.unhealthy_after {
                            server.set_healthy(false);
                            warn!(upstream = %upstream.name, server = %server.label, %reason, "server marked unhealthy");
                        }
                    }
                }
            }
        });
    }
}

/// One check: a fresh connection (TLS if the upstream uses it), `GET path`, 2xx or 3xx.
async fn probe(
    upstream: &Upstream,
    server: &Server,
    check: &HealthCheck,
) -> Result<(), ProbeError> {
    let stream = upstream.connect(server, check.timeout).await?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::get(check.path.as_str()).body(Empty::new())?;
    if let Ok(host) = HeaderValue::from_str(&server.label) {
        request.headers_mut().insert(header::HOST, host);
    }
    request.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("wsgate-health-check"),
    );
    let response = sender.send_request(request).await?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

/// Why one health check failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Connect(#[from] super::ConnectError),
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad check request: {0}")]
    Request(#[from] http::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl Server {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        self.healthy_gauge.set(i64::from(healthy));
    }
}
