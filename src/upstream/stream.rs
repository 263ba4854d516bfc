//! The connection to an upstream server: plain TCP, or TLS when `[upstreams.X] tls` is on.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamTls;

/// Where Debian, Ubuntu and Alpine keep the system's trusted CAs, used when an upstream's
/// `tls` table names no `ca`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A connection to one upstream server.
#[derive(Debug)]
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// How to speak TLS to an upstream's servers.
#[derive(Clone)]
pub struct UpstreamTlsContext {
    connector: TlsConnector,
    /// Overrides the server's host as SNI name and certificate identity.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTlsContext")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl UpstreamTlsContext {
    pub fn new(tls: &UpstreamTls) -> Self {
        let mut roots = RootCertStore::empty();
        let anchors: Vec<CertificateDer<'static>> = if tls.ca.is_empty() {
            CertificateDer::pem_file_iter(Path::new(SYSTEM_CA_BUNDLE))
                .map(|certs| certs.filter_map(Result::ok).collect())
                .unwrap_or_default()
        } else {
            tls.ca.clone()
        };
        // Certificates the store cannot use are skipped; with none left, every handshake
        // fails with "unknown issuer", which names the problem.
        let _ = roots.add_parsable_certificates(anchors);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = match ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
            Err(_) => unreachable!("the ring provider supports the default protocol versions"),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        UpstreamTlsContext {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: tls
                .server_name
                .as_deref()
                .and_then(|n| ServerName::try_from(n.to_string()).ok()),
        }
    }

    /// Runs the TLS handshake over an open TCP connection to `host`.
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> io::Result<UpstreamStream> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        };
        let tls = self.connector.connect(name, tcp).await?;
        Ok(UpstreamStream::Tls(Box::new(tls)))
    }
}

/// Lets auth's pooled HTTP client use the same connections (see `auth::client`).
impl hyper_util::client::legacy::connect::Connection for UpstreamStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl crate::ws::splice::SpliceIo for UpstreamStream {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            UpstreamStream::Plain(s) => Some(s),
            UpstreamStream::Tls(_) => None,
        }
    }

    fn socket(&self) -> Option<&TcpStream> {
        match self {
            UpstreamStream::Plain(s) => Some(s),
            UpstreamStream::Tls(s) => Some(s.get_ref().0),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
