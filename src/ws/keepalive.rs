//! Keepalive policy for one side of a tunnel: when to ping, which pong is ours, when a
//! silent peer counts as dead. Pure state over `Instant`s; the tunnel owns the timer.

use tokio::time::{Duration, Instant};

/// Length of wsgate's ping payload: a fixed tag plus 8 random bytes, so the matching pong
/// is recognised and an unsolicited pong from the peer is never mistaken for it.
pub const PING_PAYLOAD_LEN: usize = 14;
const PING_TAG: &[u8; 6] = b"wsgate";

/// Ping state towards one peer.
#[derive(Debug)]
pub struct Keepalive {
    interval: Option<Duration>,
    pong_timeout: Duration,
    /// When the peer last sent any frame.
    last_heard: Instant,
    /// The payload of the last ping sent; a pong carrying it is consumed.
    token: Option<[u8; PING_PAYLOAD_LEN]>,
    /// Set while a ping is unanswered and nothing at all was heard since.
    outstanding_since: Option<Instant>,
    /// When the ping carrying `token` went out.
    sent_at: Option<Instant>,
}

/// What the keepalive wants done now.
#[derive(Debug, PartialEq, Eq)]
pub enum KeepaliveAction {
    None,
    /// Send a ping with this payload.
    Ping([u8; PING_PAYLOAD_LEN]),
    /// The peer stayed silent for `pong_timeout` after a ping.
    Dead,
}

impl Keepalive {
    pub fn new(interval: Option<Duration>, pong_timeout: Duration, now: Instant) -> Self {
        Keepalive {
            interval,
            pong_timeout,
            last_heard: now,
            token: None,
            outstanding_since: None,
            sent_at: None,
        }
    }

    /// The peer sent a frame.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.outstanding_since = None;
    }

    /// True when `payload` answers wsgate's last ping; returns the round trip.
    pub fn is_our_pong(&mut self, payload: &[u8], now: Instant) -> Option<Duration> {
        let sent = self.token.as_ref()?;
        if payload != sent.as_slice() {
            return None;
        }
        self.token = None;
        let rtt = self.sent_at.map(|at| now.saturating_duration_since(at));
        self.sent_at = None;
        rtt
    }

    /// The expected pong payload, if a ping is out.
    pub fn token(&self) -> Option<&[u8; PING_PAYLOAD_LEN]> {
        self.token.as_ref()
    }

    /// Decides what to do at `now`.
    pub fn poll(&mut self, now: Instant) -> KeepaliveAction {
        let Some(interval) = self.interval else {
            return KeepaliveAction::None;
        };
        if let Some(since) = self.outstanding_since {
            if now >= since + self.pong_timeout {
                return KeepaliveAction::Dead;
            }
            return KeepaliveAction::None;
        }
        if now >= self.last_heard + interval {
            let mut token = [0u8; PING_PAYLOAD_LEN];
            token[..PING_TAG.len()].copy_from_slice(PING_TAG);
            token[PING_TAG.len()..].copy_from_slice(&rand::random::<[u8; 8]>());
            self.token = Some(token);
            self.sent_at = Some(now);
            self.outstanding_since = Some(now);
            return KeepaliveAction::Ping(token);
        }
        KeepaliveAction::None
    }

    /// When `poll` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let interval = self.interval?;
        Some(match self.outstanding_since {
            Some(since) => since + self.pong_timeout,
            None => self.last_heard + interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(30);
    const PONG: Duration = Duration::from_secs(10);
    const TICK: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn pings_at_the_interval_not_before_not_after() {
        let start = Instant::now();
        let mut ka = Keepalive::new(Some(INTERVAL), PONG, start);
        assert_eq!(ka.next_deadline(), Some(start + INTERVAL));
        assert_eq!(ka.poll(start + INTERVAL - TICK), KeepaliveAction::None);
        let KeepaliveAction::Ping(token) = ka.poll(start + INTERVAL) else {
            panic!("no ping at the interval");
        };
        assert_eq!(&token[..6], b"wsgate");
        assert_eq!(ka.token(), Some(&token));
        // One ping per silence: the next decision is the pong deadline.
        assert_eq!(ka.next_deadline(), Some(start + INTERVAL + PONG));
        assert_eq!(ka.poll(start + INTERVAL + TICK), KeepaliveAction::None);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_a_ping_is_dead_exactly_at_pong_timeout() {
        let start = Instant::now();
        let mut ka = Keepalive::new(Some(INTERVAL), PONG, start);
        assert!(matches!(
            ka.poll(start + INTERVAL),
            KeepaliveAction::Ping(_)
        ));
        assert_eq!(
            ka.poll(start + INTERVAL + PONG - TICK),
            KeepaliveAction::None
        );
        assert_eq!(ka.poll(start + INTERVAL + PONG), KeepaliveAction::Dead);
    }

    #[tokio::test(start_paused = true)]
    async fn any_frame_answers_and_restarts_the_interval() {
        let start = Instant::now();
        let mut ka = Keepalive::new(Some(INTERVAL), PONG, start);
        assert!(matches!(
            ka.poll(start + INTERVAL),
            KeepaliveAction::Ping(_)
        ));
        let heard = start + INTERVAL + Duration::from_secs(3);
        ka.heard(heard);
        assert_eq!(ka.poll(start + INTERVAL + PONG), KeepaliveAction::None);
        assert_eq!(ka.next_deadline(), Some(heard + INTERVAL));
        assert_eq!(ka.poll(heard + INTERVAL - TICK), KeepaliveAction::None);
        assert!(matches!(
            ka.poll(heard + INTERVAL),
            KeepaliveAction::Ping(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn only_our_pong_is_consumed_and_its_rtt_measured() {
        let start = Instant::now();
        let mut ka = Keepalive::new(Some(INTERVAL), PONG, start);
        let KeepaliveAction::Ping(token) = ka.poll(start + INTERVAL) else {
            panic!("no ping");
        };
        let answered = start + INTERVAL + Duration::from_millis(42);
        assert_eq!(ka.is_our_pong(b"someone else's", answered), None);
        let mut other = token;
        other[13] ^= 1;
        assert_eq!(ka.is_our_pong(&other, answered), None);
        assert_eq!(
            ka.is_our_pong(&token, answered),
            Some(Duration::from_millis(42))
        );
        // Consumed once: a replayed copy is the peer's own pong.
        assert_eq!(ka.is_our_pong(&token, answered), None);
        assert_eq!(ka.token(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn no_interval_never_pings() {
        let start = Instant::now();
        let mut ka = Keepalive::new(None, PONG, start);
        assert_eq!(ka.next_deadline(), None);
        assert_eq!(
            ka.poll(start + Duration::from_secs(86_400)),
            KeepaliveAction::None
        );
    }
}
