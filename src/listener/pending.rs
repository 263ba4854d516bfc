//! The connections waiting for a request head, oldest first, and the bound on how many may
//! wait at once (`[limits] max_pending_heads`).
//!
//! A slowloris client holds a connection open by sending its head a byte at a time. Each
//! such connection is cheap (see `head_guard`), but their number must still be bounded, and
//! refusing new connections when the table is full would hand the attacker the listener.
//! Instead the connection that has waited longest is closed to make room: an attacker's
//! connections are the old ones, a real client's head arrives within milliseconds.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// Locks the table is split over: a new connection takes one, chosen by its ticket number,
/// so accepts on different workers do not queue behind one lock. Only an eviction (the
/// table full, which is an attack) looks at all of them.
const SHARDS: usize = 16;

/// Every connection currently waiting for (the rest of) a request head.
#[derive(Debug, Default)]
pub struct PendingHeads {
    /// Entry order: the next ticket's number. Lower numbers waited longer.
    next: AtomicU64,
    /// Tickets in the shards (an evictor claims its victim here before taking it out).
    len: AtomicUsize,
    shards: [Shard; SHARDS],
}

/// One lock's part of the table, on its own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(Mutex<BTreeMap<u64, Arc<Eviction>>>);

impl Shard {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Eviction>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Set when a waiting connection is closed to make room for a newer one.
#[derive(Debug, Default)]
struct Eviction {
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl PendingHeads {
    /// Enters a connection that starts waiting for a head. When more than `max` connections
    /// then wait, the ones that waited longest are evicted until `max` are left.
    pub fn enter(self: &Arc<Self>, max: usize) -> Ticket {
        let eviction = Arc::new(Eviction::default());
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(seq).lock().insert(seq, eviction.clone());
        self.len.fetch_add(1, Ordering::AcqRel);
        let max = max.max(1);
        // Each eviction is claimed by taking one off `len` first, so threads entering at
        // the same time evict exactly the excess between them, never more.
        while self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |len| {
                (len > max).then(|| len - 1)
            })
            .is_ok()
        {
            match self.pop_oldest() {
                // Woken outside the lock: a waker may run code of its own.
                Some(oldest) => {
                    oldest.evicted.store(true, Ordering::Release);
                    oldest.waker.wake();
                }
                // Every candidate left on its own meanwhile (and counted itself out).
                None => {
                    self.len.fetch_add(1, Ordering::AcqRel);
                    break;
                }
            }
        }
        Ticket {
            registry: self.clone(),
            seq,
            eviction,
        }
    }

    /// How many connections wait now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, seq: u64) -> &Shard {
        &self.shards[(seq % SHARDS as u64) as usize]
    }

    /// Takes out the connection that has waited longest: the lowest of the shards' first
    /// tickets. A shard's first may leave between the look and the take; its next one is
    /// then taken, which has still waited longer than anything entered since.
    fn pop_oldest(&self) -> Option<Arc<Eviction>> {
        let mut oldest: Option<(u64, usize)> = None;
        for (i, shard) in self.shards.iter().enumerate() {
            if let Some((&seq, _)) = shard.lock().first_key_value() {
                if oldest.is_none_or(|(o, _)| seq < o) {
                    oldest = Some((seq, i));
                }
            }
        }
        let (_, first) = oldest?;
        // Start at the shard that held the oldest; fall through to the others if it emptied.
        (0..SHARDS)
            .map(|k| &self.shards[(first + k) % SHARDS])
            .find_map(|shard| shard.lock().pop_first().map(|(_, e)| e))
    }
}

/// One waiting connection's place in [`PendingHeads`]; leaving is dropping it.
#[derive(Debug)]
pub struct Ticket {
    registry: Arc<PendingHeads>,
    seq: u64,
    eviction: Arc<Eviction>,
}

impl Ticket {
    /// Ready once the connection was evicted to make room for a newer one.
    pub fn poll_evicted(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.eviction.evicted.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.eviction.waker.register(cx.waker());
        if self.eviction.evicted.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Completes when the connection is evicted.
    pub fn evicted(&self) -> Evicted<'_> {
        Evicted { ticket: self }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.eviction.evicted.load(Ordering::Acquire)
            && self
                .registry
                .shard(self.seq)
                .lock()
                .remove(&self.seq)
                .is_some()
        {
            self.registry.len.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Future of [`Ticket::evicted`].
#[derive(Debug)]
pub struct Evicted<'a> {
    ticket: &'a Ticket,
}

impl Future for Evicted<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.ticket.poll_evicted(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Noop;

    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }

    fn poll(ticket: &Ticket) -> Poll<()> {
        let waker = std::task::Waker::from(Arc::new(Noop));
        ticket.poll_evicted(&mut Context::from_waker(&waker))
    }

    #[test]
    fn the_oldest_waiting_connection_makes_room() {
        let heads = Arc::new(PendingHeads::default());
        let first = heads.enter(2);
        let second = heads.enter(2);
        assert_eq!(heads.len(), 2);
        assert!(poll(&first).is_pending());

        let third = heads.enter(2);
        assert_eq!(heads.len(), 2);
        assert!(poll(&first).is_ready());
        assert!(poll(&second).is_pending());
        assert!(poll(&third).is_pending());

        drop(first);
        assert_eq!(heads.len(), 2, "an evicted ticket was already removed");
        drop(second);
        assert_eq!(heads.len(), 1);
        drop(third);
        assert!(heads.is_empty());
    }

    #[test]
    fn eviction_is_oldest_first_across_the_shards() {
        let heads = Arc::new(PendingHeads::default());
        let max = 3 * SHARDS + 5;
        let tickets: Vec<Ticket> = (0..max + 7).map(|_| heads.enter(max)).collect();
        assert_eq!(heads.len(), max);
        let evicted: Vec<bool> = tickets.iter().map(|t| poll(t).is_ready()).collect();
        assert!(evicted[..7].iter().all(|&e| e), "the 7 oldest go");
        assert!(evicted[7..].iter().all(|&e| !e), "no newer one goes");
        drop(tickets);
        assert!(heads.is_empty());
    }

    #[test]
    fn threads_entering_at_once_evict_exactly_the_excess() {
        let heads = Arc::new(PendingHeads::default());
        let max = 40;
        let kept: Vec<Vec<Ticket>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| (0..500).map(|_| heads.enter(max)).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker panicked"))
                .collect()
        });
        let waiting = kept
            .iter()
            .flatten()
            .filter(|t| poll(t).is_pending())
            .count();
        assert_eq!(heads.len(), max);
        assert_eq!(
            waiting, max,
            "every ticket not evicted is counted, and no more"
        );
        drop(kept);
        assert!(heads.is_empty());
    }

    #[test]
    fn leaving_frees_a_place_without_evicting() {
        let heads = Arc::new(PendingHeads::default());
        let first = heads.enter(1);
        drop(first);
        let second = heads.enter(1);
        assert!(poll(&second).is_pending());
        assert_eq!(heads.len(), 1);
    }

    #[tokio::test]
    async fn eviction_wakes_the_waiting_task() {
        let heads = Arc::new(PendingHeads::default());
        let first = heads.enter(1);
        let waiter = tokio::spawn(async move {
            first.evicted().await;
        });
        tokio::task::yield_now().await;
        let _second = heads.enter(1);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("the evicted connection was not woken")
            .expect("waiter panicked");
    }
}
