//! What the status page shows beyond the live connection list: the last connection ends
//! (a fixed ring) and an hour of live connections and handshakes per second (a fixed
//! history, sampled every 10 s from the metrics). Both are fixed size, filled off the
//! relay path: a tunnel adds one entry when it ends, the sampler reads counters the proxy
//! keeps anyway.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Connection ends kept for the page.
pub const CLOSES_KEPT: usize = 200;
/// History resolution and length: one hour at 10 s.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
pub const SAMPLES_KEPT: usize = 360;
/// Longest close reason RFC 6455 allows (a close payload is at most 125 bytes).
const MAX_REASON: usize = 123;

/// One ended connection, stored inline so the ring never allocates after it is made.
#[derive(Clone, Copy)]
struct Closed {
    at_ms: u64,
    id: u64,
    duration_ms: u64,
    client: SocketAddr,
    route: [u8; 64],
    route_len: u8,
    initiator: &'static str,
    code: Option<u16>,
    reason: [u8; MAX_REASON],
    reason_len: u8,
}

/// A connection end as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClosedView {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub id: u64,
    pub client: String,
    pub route: String,
    /// `client`, `upstream` or `proxy`.
    pub closed_by: &'static str,
    pub code: Option<u16>,
    pub reason: String,
    pub duration_ms: u64,
}

/// What ended: passed to [`CloseRing::push`].
pub struct Ended<'a> {
    pub id: u64,
    pub client: SocketAddr,
    pub route: &'a str,
    pub closed_by: &'static str,
    pub code: Option<u16>,
    pub reason: &'a str,
    pub duration: Duration,
}

/// The last [`CLOSES_KEPT`] connection ends, newest last. Each slot has its own lock and
/// a writer claims its slot with one atomic add, so connections ending on different
/// threads do not wait for each other.
pub struct CloseRing {
    slots: Box<[Mutex<Option<Closed>>]>,
    /// Entries written so far; the next goes to `written % CLOSES_KEPT`.
    written: AtomicUsize,
}

impl Default for CloseRing {
    fn default() -> Self {
        CloseRing {
            slots: (0..CLOSES_KEPT).map(|_| Mutex::new(None)).collect(),
            written: AtomicUsize::new(0),
        }
    }
}

impl std::fmt::Debug for CloseRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CloseRing")
    }
}

/// Copies the start of `text` (cut at a character boundary) into `out`; returns the length.
fn store(text: &str, out: &mut [u8]) -> u8 {
    let mut len = text.len().min(out.len());
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    out[..len].copy_from_slice(&text.as_bytes()[..len]);
    len as u8
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl CloseRing {
    /// Bytes the ring holds, whatever happens (reported in docs/performance.md).
    pub const BYTES: usize = std::mem::size_of::<[Mutex<Option<Closed>>; CLOSES_KEPT]>();

    pub fn push(&self, ended: Ended<'_>) {
        let mut entry = Closed {
            at_ms: unix_ms(),
            id: ended.id,
            duration_ms: ended.duration.as_millis() as u64,
            client: ended.client,
            route: [0; 64],
            route_len: 0,
            initiator: ended.closed_by,
            code: ended.code,
            reason: [0; MAX_REASON],
            reason_len: 0,
        };
        entry.route_len = store(ended.route, &mut entry.route);
        entry.reason_len = store(ended.reason, &mut entry.reason);
        let at = self.written.fetch_add(1, Ordering::Relaxed) % CLOSES_KEPT;
        *self.slots[at].lock().unwrap_or_else(|e| e.into_inner()) = Some(entry);
    }

    /// Every kept end, oldest first.
    pub fn list(&self) -> Vec<ClosedView> {
        let next = self.written.load(Ordering::Relaxed) % CLOSES_KEPT;
        let (newer, older) = self.slots.split_at(next);
        let mut entries: Vec<Closed> = older
            .iter()
            .chain(newer)
            .filter_map(|slot| *slot.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        // Writers racing with this read may land out of place by a slot: order by time.
        entries.sort_by_key(|c| (c.at_ms, c.id));
        entries
            .into_iter()
            .map(|c| ClosedView {
                at_ms: c.at_ms,
                id: c.id,
                client: c.client.to_string(),
                route: String::from_utf8_lossy(&c.route[..usize::from(c.route_len)]).into_owned(),
                closed_by: c.initiator,
                code: c.code,
                reason: String::from_utf8_lossy(&c.reason[..usize::from(c.reason_len)])
                    .into_owned(),
                duration_ms: c.duration_ms,
            })
            .collect()
    }
}

// Both stay this size whatever happens (docs/performance.md gives the figures).
const _: () = assert!(CloseRing::BYTES <= 56_000 && History::BYTES <= 8_640);

/// One history sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the Unix epoch when it was taken.
    pub at: u64,
    pub live: u64,
    pub handshakes_per_second: f64,
}

/// The last hour of samples, oldest first.
pub struct History {
    inner: Mutex<HistoryRing>,
}

struct HistoryRing {
    samples: [Sample; SAMPLES_KEPT],
    len: usize,
    next: usize,
    /// Handshakes counted at the previous sample, for the rate.
    last_handshakes: Option<(u64, u64)>,
}

impl Default for History {
    fn default() -> Self {
        History {
            inner: Mutex::new(HistoryRing {
                samples: [Sample::default(); SAMPLES_KEPT],
                len: 0,
                next: 0,
                last_handshakes: None,
            }),
        }
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("History")
    }
}

impl History {
    /// Bytes the history holds, whatever happens.
    pub const BYTES: usize = std::mem::size_of::<[Sample; SAMPLES_KEPT]>();

    /// Adds a sample taken at `at_ms` (Unix milliseconds) with `live` WebSockets and
    /// `handshakes` counted since the start; the rate comes from the previous sample.
    pub fn record(&self, at_ms: u64, live: u64, handshakes: u64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rate = match h.last_handshakes {
            Some((then_ms, count)) if at_ms > then_ms => {
                handshakes.saturating_sub(count) as f64 * 1000.0 / (at_ms - then_ms) as f64
            }
            _ => 0.0,
        };
        h.last_handshakes = Some((at_ms, handshakes));
        let at = h.next;
        h.samples[at] = Sample {
            at: at_ms / 1000,
            live,
            handshakes_per_second: rate,
        };
        h.next = (at + 1) % SAMPLES_KEPT;
        h.len = (h.len + 1).min(SAMPLES_KEPT);
    }

    /// The kept samples, oldest first.
    pub fn list(&self) -> Vec<Sample> {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (newer, older) = h.samples.split_at(h.next);
        let all: Vec<Sample> = older.iter().chain(newer).copied().collect();
        all[SAMPLES_KEPT - h.len..].to_vec()
    }
}

/// The ring and the history of one process.
#[derive(Debug, Default)]
pub struct Status {
    pub closes: CloseRing,
    pub history: History,
}

impl Status {
    pub fn new() -> Arc<Status> {
        Arc::new(Status::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(id: u64, reason: &str) -> Ended<'_> {
        Ended {
            id,
            client: SocketAddr::from(([10, 0, 0, 1], 5000)),
            route: "chat",
            closed_by: "client",
            code: Some(1000),
            reason,
            duration: Duration::from_millis(1500),
        }
    }

    #[test]
    fn the_ring_keeps_the_last_200_oldest_first() {
        let ring = CloseRing::default();
        assert!(ring.list().is_empty());
        for id in 1..=3 {
            ring.push(ended(id, "bye"));
        }
        let ids: Vec<u64> = ring.list().iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        for id in 4..=450 {
            ring.push(ended(id, "bye"));
        }
        let list = ring.list();
        assert_eq!(list.len(), CLOSES_KEPT);
        assert_eq!(list.first().map(|c| c.id), Some(251));
        assert_eq!(list.last().map(|c| c.id), Some(450));
        let last = list.last().cloned().unwrap_or_else(|| unreachable!());
        assert_eq!(
            (
                last.route.as_str(),
                last.closed_by,
                last.code,
                last.reason.as_str(),
                last.duration_ms
            ),
            ("chat", "client", Some(1000), "bye", 1500)
        );
        assert_eq!(last.client, "10.0.0.1:5000");
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let ring = CloseRing::default();
        let reason = "é".repeat(100); // 200 bytes
        ring.push(ended(1, &reason));
        let kept = &ring.list()[0].reason;
        assert_eq!(kept.len(), 122, "61 two-byte characters fit in 123 bytes");
        assert!(reason.starts_with(kept.as_str()));
    }

    #[test]
    fn the_history_keeps_an_hour_and_computes_rates() {
        let history = History::default();
        history.record(1_000_000, 5, 100);
        history.record(1_010_000, 7, 150);
        let list = history.list();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0].handshakes_per_second, 0.0,
            "no rate before two samples"
        );
        assert_eq!(
            (list[1].at, list[1].live, list[1].handshakes_per_second),
            (1010, 7, 5.0)
        );
        for i in 2..500u64 {
            history.record(1_000_000 + i * 10_000, i, 150 + i);
        }
        let list = history.list();
        assert_eq!(list.len(), SAMPLES_KEPT);
        assert_eq!(list.last().map(|s| s.live), Some(499));
        assert_eq!(list.first().map(|s| s.live), Some(499 - 359));
        assert!(list.windows(2).all(|w| w[0].at < w[1].at), "oldest first");
        assert_eq!(list[100].handshakes_per_second, 0.1);
    }
}
