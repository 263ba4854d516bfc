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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// Every connection currently waiting for (the rest of) a request head.
#[derive(Debug, Default)]
pub struct PendingHeads {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Entry order: the next ticket's number. Lower numbers waited longer.
    next: u64,
    waiting: BTreeMap<u64, Arc<Eviction>>,
}

/// Set when a waiting connection is closed to make room for a newer one.
#[derive(Debug, Default)]
struct Eviction {
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl PendingHeads {
    /// Enters a connection that starts waiting for a head. When `max` connections already
    /// wait, the ones that waited longest are evicted until there is room.
    pub fn enter(self: &Arc<Self>, max: usize) -> Ticket {
        let eviction = Arc::new(Eviction::default());
        let (seq, evicted) = {
            let mut inner = self.lock();
            let mut evicted = Vec::new();
            while inner.waiting.len() >= max.max(1) {
                match inner.waiting.pop_first() {
                    Some((_, oldest)) => evicted.push(oldest),
                    None => break,
                }
            }
            let seq = inner.next;
            inner.next += 1;
            inner.waiting.insert(seq, eviction.clone());
            (seq, evicted)
        };
        // Woken outside the lock: a waker may run code of its own.
        for oldest in evicted {
            oldest.evicted.store(true, Ordering::Release);
            oldest.waker.wake();
        }
        Ticket {
            registry: self.clone(),
            seq,
            eviction,
        }
    }

    /// How many connections wait now.
    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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
        if !self.eviction.evicted.load(Ordering::Acquire) {
            self.registry.lock().waiting.remove(&self.seq);
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
