//! The small HTTP client auth uses for JWKS URLs and forward-auth services: pooled
//! keep-alive HTTP/1.1 over TCP or TLS, with the same TLS settings as upstreams (the
//! system's trusted CAs, or the `ca` the config names).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;

use crate::config::UpstreamTls;
use crate::upstream::{UpstreamStream, UpstreamTlsContext};

/// Idle connections to one auth service or key server kept open.
const MAX_IDLE_PER_HOST: usize = 32;
/// An idle pooled connection is closed after this; auth services often close sooner.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request to an auth service or key server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no answer within {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    Failed(String),
}

/// A pooled client for one set of trust anchors.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<Connector, Empty<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    pub fn new(ca: &[CertificateDer<'static>]) -> Self {
        let tls = UpstreamTlsContext::new(&UpstreamTls {
            ca: ca.to_vec(),
            server_name: None,
        });
        let inner = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .build(Connector { tls });
        HttpClient { inner }
    }

    /// Sends `req` and waits for the answer's head, all within `timeout`.
    pub async fn send(
        &self,
        req: Request<Empty<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, FetchError> {
        match tokio::time::timeout(timeout, self.inner.request(req)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(FetchError::Failed(error_chain(&e))),
            Err(_) => Err(FetchError::Timeout(timeout.as_millis())),
        }
    }
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, FetchError> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| FetchError::Failed(error_chain(&e)))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(FetchError::Failed(format!(
                    "the body is larger than {limit} bytes"
                )));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// An error and its causes on one line ("client error (Connect): connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Opens TCP (with `TCP_NODELAY`), then TLS for https.
#[derive(Clone)]
struct Connector {
    tls: UpstreamTlsContext,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = if https {
                tls.connect(&host, tcp).await?
            } else {
                UpstreamStream::Plain(tcp)
            };
            Ok(TokioIo::new(stream))
        })
    }
}
