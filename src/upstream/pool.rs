//! Idle HTTP/1.1 connections to one server, kept for reuse by plain requests.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use super::Server;

/// The request half of an upstream HTTP/1.1 connection; request bodies stream from the client.
pub type HttpSender = SendRequest<Incoming>;

/// How long an unused upstream connection is kept. Below the usual 60-75 s keep-alive
/// timeouts of app servers, so wsgate rarely reuses a connection the server is closing.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Idle connections kept per server; more are closed. Bounds the sockets a burst leaves behind.
const MAX_IDLE_PER_SERVER: usize = 128;

#[derive(Debug, Default)]
pub(super) struct IdlePool {
    conns: Mutex<Vec<(HttpSender, Instant)>>,
}

impl Server {
    /// Takes the most recently used idle connection that is still open, if any.
    pub fn take_idle(&self) -> Option<HttpSender> {
        let mut conns = self.idle.conns.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Oldest first in the Vec, so the expired ones are a prefix: found by bisection,
        // not by visiting every idle connection on every request.
        let expired = conns
            .partition_point(|(_, since)| now.saturating_duration_since(*since) >= IDLE_TIMEOUT);
        conns.drain(..expired);
        // The newest that is still open; closed ones met on the way are dropped.
        while let Some((sender, _)) = conns.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: HttpSender) {
        if sender.is_closed() {
            return;
        }
        let mut conns = self.idle.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < MAX_IDLE_PER_SERVER {
            conns.push((sender, Instant::now()));
        }
    }
}

/// A connection lent to one request; `release` returns it to its server's idle pool.
#[derive(Debug)]
pub struct PooledSender {
    pub server: Arc<Server>,
    pub sender: HttpSender,
}

impl PooledSender {
    /// Returns the connection for reuse; called once the response body has been read to its end.
    pub fn release(self) {
        self.server.put_idle(self.sender);
    }
}
