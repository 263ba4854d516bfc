//! One record per live WebSocket: identity, counters the relay bumps once per read batch,
//! and the close request channel the admin API and drain use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Instant;

use atomic_waker::AtomicWaker;

use crate::metrics::RouteMetrics;

pub use super::side::{Direction, Initiator};

/// Live counters of one direction.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// WebSocket bytes relayed, frame headers included.
    pub bytes: AtomicU64,
    pub frames: AtomicU64,
}

/// The shared record of one live connection.
#[derive(Debug)]
pub struct ConnRecord {
    pub identity: Identity,
    /// The route's metric handles, bumped by the relay as it flushes its counters.
    pub metrics: Arc<RouteMetrics>,
    pub client_to_upstream: DirectionStats,
    pub upstream_to_client: DirectionStats,
    /// Milliseconds since `identity.started` at the last frame seen either way.
    pub last_activity_ms: AtomicU64,
    /// Round trip of the last answered keepalive ping, in microseconds; `u64::MAX` = none yet.
    pub ping_rtt_us: AtomicU64,
    /// Close code requested from outside (admin API, drain); 0 = none.
    close_request: AtomicU32,
    waker: AtomicWaker,
}

/// An outside request to close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRequest {
    /// `DELETE /connections/{id}`: close 1001 "closed by operator".
    Operator,
    /// Drain: close 1001 "going away".
    Drain,
}

/// Who a connection is: fixed at the upgrade.
#[derive(Debug)]
pub struct Identity {
    pub id: u64,
    pub client: SocketAddr,
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub upstream: Option<Arc<str>>,
    pub server: Option<Arc<str>>,
    pub http_version: &'static str,
    pub subprotocol: Option<String>,
    pub started: Instant,
}

impl ConnRecord {
    pub fn new(identity: Identity, metrics: Arc<RouteMetrics>) -> Self {
        ConnRecord {
            identity,
            metrics,
            client_to_upstream: DirectionStats::default(),
            upstream_to_client: DirectionStats::default(),
            last_activity_ms: AtomicU64::new(0),
            ping_rtt_us: AtomicU64::new(u64::MAX),
            close_request: AtomicU32::new(0),
            waker: AtomicWaker::new(),
        }
    }

    pub fn stats(&self, direction: Direction) -> &DirectionStats {
        match direction {
            Direction::ClientToUpstream => &self.client_to_upstream,
            Direction::UpstreamToClient => &self.upstream_to_client,
        }
    }

    /// Asks the tunnel to close; the first request wins.
    pub fn request_close(&self, request: CloseRequest) {
        let code = match request {
            CloseRequest::Operator => 1,
            CloseRequest::Drain => 2,
        };
        let _ = self
            .close_request
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.waker.wake();
    }

    /// Registers the tunnel's waker and returns a pending close request, if any.
    pub fn poll_close_request(&self, waker: &Waker) -> Option<CloseRequest> {
        self.waker.register(waker);
        match self.close_request.load(Ordering::Acquire) {
            1 => Some(CloseRequest::Operator),
            2 => Some(CloseRequest::Drain),
            _ => None,
        }
    }

    pub fn ping_rtt_ms(&self) -> Option<f64> {
        match self.ping_rtt_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(us as f64 / 1000.0),
        }
    }
}

/// Shards of the registry: handshakes on different worker threads rarely meet on one lock.
const SHARDS: usize = 16;

type Shard = Mutex<HashMap<u64, Arc<ConnRecord>>>;

/// The live WebSocket connections, by id: what the admin API lists and drain closes.
/// Sharded by id, so registering and unregistering (once per connection each) take one
/// of 16 locks rather than one process-wide lock.
#[derive(Debug, Default)]
pub struct Connections {
    shards: [Shard; SHARDS],
    /// The last connection ends, for the status page.
    pub ended: crate::status::CloseRing,
}

impl Connections {
    /// Adds a connection until the returned guard is dropped.
    pub fn register(&self, record: Arc<ConnRecord>) -> Registered<'_> {
        let id = record.identity.id;
        self.shard(id).insert(id, record);
        Registered {
            connections: self,
            id,
        }
    }

    pub fn get(&self, id: u64) -> Option<Arc<ConnRecord>> {
        self.shard(id).get(&id).cloned()
    }

    /// A snapshot of every live connection, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<ConnRecord>> {
        let mut all: Vec<_> = Vec::with_capacity(self.len());
        for shard in &self.shards {
            all.extend(lock(shard).values().cloned());
        }
        all.sort_by_key(|r| r.identity.id);
        all
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnRecord>>> {
        // Ids are handed out in sequence, so consecutive connections land on different shards.
        lock(&self.shards[(id % SHARDS as u64) as usize])
    }
}

fn lock(shard: &Shard) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnRecord>>> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes its connection from the registry on drop.
#[derive(Debug)]
pub struct Registered<'a> {
    connections: &'a Connections,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.connections.shard(self.id).remove(&self.id);
    }
}
