//! Admission limits for WebSocket upgrades: live connections in the whole process, live
//! connections per client address, and a handshake-rate token bucket per client address.
//!
//! Per-address state is kept in a few mutex-guarded shards, touched once per handshake and
//! once per connection end. Entries that hold no live connection and a full bucket carry no
//! information and are swept, and the table has a hard cap, so a flood of distinct
//! addresses cannot grow memory without bound. IPv6 clients are grouped by their /64, the
//! block one subscriber usually gets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::{Duration, Instant};

use crate::config::Limits;

/// Shards of the per-address table; spreads lock contention across worker threads.
const SHARDS: usize = 16;

/// Most addresses tracked at once (all shards together). 64 bytes an entry keeps the
/// table under ~16 MiB even when full.
pub const MAX_TRACKED_ADDRESSES: usize = 256 * 1024;

/// Why an upgrade was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `max_connections` live WebSockets already (503).
    #[error("the proxy is at max_connections")]
    MaxConnections,
    /// `max_connections_per_ip` live WebSockets from this address already (429).
    #[error("this address is at max_connections_per_ip")]
    PerIp,
    /// `handshake_rate_per_ip` exceeded (429).
    #[error("this address is over handshake_rate_per_ip")]
    RateLimit,
}

/// Client address as tracked: IPv4 as is, IPv6 by /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

#[derive(Debug)]
struct Entry {
    live: u64,
    tokens: f64,
    refilled: Instant,
}

/// Process-wide admission state; survives reloads (the limits themselves are reloadable).
#[derive(Debug)]
pub struct Admission {
    live: AtomicU64,
    shards: Vec<Mutex<HashMap<IpAddr, Entry>>>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            live: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Admission {
    fn shard(&self, key: &IpAddr) -> MutexGuard<'_, HashMap<IpAddr, Entry>> {
        let index = match key {
            IpAddr::V4(v4) => u32::from(*v4) as usize,
            IpAddr::V6(v6) => (u128::from(*v6) >> 64) as usize,
        } % SHARDS;
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live WebSocket connections admitted and not yet ended.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Admits one upgrade from `ip` or says why not. The permit counts the connection as
    /// live until dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<Permit, Refusal> {
        let now = Instant::now();
        let key = key(ip);
        let mut shard = self.shard(&key);
        if !shard.contains_key(&key) && shard.len() >= MAX_TRACKED_ADDRESSES / SHARDS {
            sweep(&mut shard, limits, now);
        }
        let tracked = shard.contains_key(&key) || shard.len() < MAX_TRACKED_ADDRESSES / SHARDS;
        let capacity = limits
            .handshake_rate_per_ip
            .map(|r| r.count as f64)
            .unwrap_or(0.0);
        let mut fresh = Entry {
            live: 0,
            tokens: capacity,
            refilled: now,
        };
        let entry = if tracked {
            shard.entry(key).or_insert(fresh)
        } else {
            // The table is full of addresses with live connections: admit this one
            // unaccounted rather than refuse a client for others' sake.
            &mut fresh
        };
        if let Some(rate) = limits.handshake_rate_per_ip {
            let per_second = rate.count as f64 / rate.per.as_secs_f64().max(f64::MIN_POSITIVE);
            let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
            entry.tokens = (entry.tokens + elapsed * per_second).min(rate.count as f64);
            entry.refilled = now;
            if entry.tokens < 1.0 {
                return Err(Refusal::RateLimit);
            }
            entry.tokens -= 1.0;
        }
        if limits.max_connections_per_ip != 0 && entry.live >= limits.max_connections_per_ip {
            return Err(Refusal::PerIp);
        }
        // Reserve a slot in the process-wide count; undo on overflow.
        if self.live.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::MaxConnections);
        }
        entry.live += 1;
        Ok(Permit {
            admission: self.clone(),
            key: tracked.then_some(key),
        })
    }

    fn release(&self, key: Option<IpAddr>) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        if let Some(key) = key {
            let mut shard = self.shard(&key);
            if let Some(entry) = shard.get_mut(&key) {
                entry.live = entry.live.saturating_sub(1);
            }
        }
    }
}

/// Drops entries that hold no live connection and whose bucket would be full by now.
fn sweep(shard: &mut HashMap<IpAddr, Entry>, limits: &Limits, now: Instant) {
    let refill = limits
        .handshake_rate_per_ip
        .map(|r| r.per)
        .unwrap_or(Duration::ZERO);
    shard.retain(|_, e| e.live > 0 || now.saturating_duration_since(e.refilled) < refill);
}

/// One admitted connection; releases its slot on drop.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    key: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;

    fn limits(max: u64, per_ip: u64, rate: Option<u64>) -> Limits {
        Limits {
            max_connections: max,
            max_connections_per_ip: per_ip,
            handshake_rate_per_ip: rate.map(|count| Rate {
                count,
                per: Duration::from_secs(1),
            }),
            ..Limits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn process_wide_limit() {
        let a = Arc::new(Admission::default());
        let l = limits(2, 10, None);
        let p1 = a.admit("10.0.0.1".parse().unwrap(), &l).unwrap();
        let _p2 = a.admit("10.0.0.2".parse().unwrap(), &l).unwrap();
        assert_eq!(
            a.admit("10.0.0.3".parse().unwrap(), &l).unwrap_err(),
            Refusal::MaxConnections
        );
        drop(p1);
        assert!(a.admit("10.0.0.3".parse().unwrap(), &l).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn per_ip_limit_groups_ipv6_by_64() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 2, None);
        let _p1 = a.admit("2001:db8::1".parse().unwrap(), &l).unwrap();
        let _p2 = a.admit("2001:db8::2".parse().unwrap(), &l).unwrap();
        assert_eq!(
            a.admit("2001:db8::3".parse().unwrap(), &l).unwrap_err(),
            Refusal::PerIp
        );
        assert!(a.admit("2001:db8:1::1".parse().unwrap(), &l).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_refills() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 100, Some(2));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let _p1 = a.admit(ip, &l).unwrap();
        let _p2 = a.admit(ip, &l).unwrap();
        assert_eq!(a.admit(ip, &l).unwrap_err(), Refusal::RateLimit);
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(a.admit(ip, &l).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_are_swept_and_table_is_bounded() {
        let a = Arc::new(Admission::default());
        let l = limits(u64::MAX, 10, Some(5));
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 1000) {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            drop(a.admit(ip, &l).unwrap());
        }
        assert!(a.tracked() <= MAX_TRACKED_ADDRESSES);
        tokio::time::advance(Duration::from_secs(2)).await;
        for i in 0..1000u32 {
            let ip = IpAddr::V4((0x0b00_0000 + i).into());
            drop(a.admit(ip, &l).unwrap());
        }
        assert!(a.tracked() < MAX_TRACKED_ADDRESSES / 2, "{}", a.tracked());
        assert_eq!(a.live(), 0);
    }
}
