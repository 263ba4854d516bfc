//! TLS termination with rustls: TLS 1.2 and 1.3 only, ALPN, and certificates chosen by SNI
//! with a default for clients that send no name or an unknown one.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::{CertKey, TlsConfig};

/// Picks the certificate for a ClientHello: exact SNI name, then a `*.` wildcard entry for
/// the name's parent, then the default.
#[derive(Debug)]
pub struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.by_name.get(&name) {
            return Some(key.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.by_name.get(&format!("*.{parent}")) {
                return Some(key.clone());
            }
        }
        Some(self.default.clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(
    ck: &CertKey,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    CertifiedKey::from_der(ck.chain.clone(), ck.key.clone_key(), provider).map(Arc::new)
}

/// ALPN protocol id of HTTP/2 over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Builds the rustls server configuration for one listener: ALPN offers `h2` (preferred)
/// then `http/1.1` when the listener serves HTTP/2, `http/1.1` alone otherwise.
pub fn server_config(tls: &TlsConfig, http2: bool) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let mut by_name = HashMap::new();
    for sni in &tls.sni {
        by_name.insert(
            sni.server_name.clone(),
            certified_key(&sni.cert, &provider)?,
        );
    }
    let resolver = SniResolver {
        by_name,
        default: certified_key(&tls.default, &provider)?,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = if http2 {
        vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}
