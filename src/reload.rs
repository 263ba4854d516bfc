//! Hot reload (SIGHUP, `POST /reload`): re-read and validate the whole file, then swap
//! routes, upstreams, timeouts, limits and certificates in at once for new connections.
//! Live connections keep the generation they started with; a bad file changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::gateway::{Gateway, Shared};
use crate::listener::{self, BoundListener};

/// What a listener was started with; changing it needs a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ListenerShape {
    bind: SocketAddr,
    tls: bool,
    http2: bool,
    http2_max_streams: u32,
}

/// Reloads one configuration file into a running server.
pub struct Reloader {
    path: PathBuf,
    shared: Arc<Shared>,
    /// The certificate store of every TLS listener, by listener name.
    tls: HashMap<String, Arc<ArcSwap<ServerConfig>>>,
    listeners: HashMap<String, ListenerShape>,
    admin_bind: SocketAddr,
    /// One reload at a time.
    running: Mutex<()>,
}

impl Reloader {
    pub fn new(config: Config, shared: Arc<Shared>, bound: &[BoundListener]) -> Self {
        Reloader {
            path: config.source.clone(),
            shared,
            tls: bound
                .iter()
                .filter_map(|b| b.tls.clone().map(|t| (b.name.to_string(), t)))
                .collect(),
            listeners: config
                .listeners
                .iter()
                .map(|l| {
                    let shape = ListenerShape {
                        bind: l.bind,
                        tls: l.tls.is_some(),
                        http2: l.http2,
                        http2_max_streams: l.http2_max_streams,
                    };
                    (l.name.clone(), shape)
                })
                .collect(),
            admin_bind: config.admin.bind,
            running: Mutex::new(()),
        }
    }

    /// Re-reads the file. On success returns notes about what could not change without a
    /// restart (listener addresses); on failure returns the error text and changes nothing.
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
        let _one_at_a_time = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.try_reload();
        self.shared.metrics.config_reload(result.is_ok());
        match &result {
            Ok(notes) => {
                info!(file = %self.path.display(), "configuration reloaded");
                for note in notes {
                    warn!("{note}");
                }
            }
            Err(e) => {
                error!(file = %self.path.display(), "reload failed, keeping the running configuration:\n{e}")
            }
        }
        result
    }

    fn try_reload(&self) -> Result<Vec<String>, ReloadError> {
        let config = Config::load(&self.path)?;
        // Build every certificate store first, so a failure leaves everything as it was.
        let mut new_tls = Vec::new();
        for l in &config.listeners {
            if let (Some(tls), Some(store)) = (&l.tls, self.tls.get(&l.name)) {
                // ALPN follows what the running listener serves: a changed `http2` takes a
                // restart (noted below).
                let http2 = self.listeners.get(&l.name).map_or(l.http2, |s| s.http2);
                let server_config = listener::tls::server_config(tls, http2).map_err(|source| {
                    ReloadError::Tls {
                        listener: l.name.clone(),
                        source,
                    }
                })?;
                new_tls.push((store, server_config));
            }
        }
        let mut notes = Vec::new();
        for l in &config.listeners {
            let shape = ListenerShape {
                bind: l.bind,
                tls: l.tls.is_some(),
                http2: l.http2,
                http2_max_streams: l.http2_max_streams,
            };
            match self.listeners.get(&l.name) {
                None => notes.push(format!(
                    "listener {} is new: it opens on the next restart",
                    l.name
                )),
                Some(old) if *old != shape => notes.push(format!(
                    "listener {} changed its address, TLS or HTTP/2 setting: that takes a restart",
                    l.name
                )),
                Some(_) => {}
            }
        }
        for name in self.listeners.keys() {
            if !config.listeners.iter().any(|l| &l.name == name) {
                notes.push(format!(
                    "listener {name} was removed: it closes on the next restart"
                ));
            }
        }
        if config.admin.bind != self.admin_bind {
            notes.push("the admin address changed: that takes a restart".to_string());
        }

        for (store, server_config) in new_tls {
            store.store(server_config);
        }
        let gateway = Gateway::new(&config, &self.shared.metrics, &self.shared.jwks);
        self.shared.gateway.store(Arc::new(gateway));
        Ok(notes)
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is unreadable or invalid (every problem, `file:line:col: message`).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("listener {listener}: TLS setup failed: {source}")]
    Tls {
        listener: String,
        #[source]
        source: rustls::Error,
    },
}
