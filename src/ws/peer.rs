//! What a socket's readiness says about its peer, read without taking a byte from it.
//!
//! A direction whose destination stops reading stops reading its source too
//! (backpressure), and a source that is not read cannot report its end: a client that
//! resets while the upstream is stalled would only be noticed by the next keepalive ping.
//! The tunnel asks this instead, once a second while a direction is held up.

use tokio::net::TcpStream;

/// The peer's end of a connection, as its socket's readiness shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Nothing shows it ended (unread data may wait).
    Open,
    /// It closed its sending side (FIN): what it sent before is still readable.
    Closed,
    /// The connection failed (a reset): nothing more can be read or written.
    Reset,
}

/// The peer's state, from a zero-timeout `poll(2)` for hang-up and error readiness.
#[cfg(target_os = "linux")]
pub fn peer_state(tcp: &TcpStream) -> PeerState {
    use std::os::fd::AsRawFd;

    let mut fd = libc::pollfd {
        fd: tcp.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `fd` is one initialised `pollfd` that lives across the call, and the count
    // passed is 1, so the kernel writes only its `revents`; the descriptor is owned by
    // `tcp`, which the borrow keeps open; a zero timeout never blocks. tokio offers no
    // non-blocking query of read-closed or error readiness without reading, so this is the
    // one way to ask without consuming the peer's data.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    if ready <= 0 {
        PeerState::Open
    } else if fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        // The relay never shuts its own side while relaying, so a hang-up both ways means
        // the peer reset (or vanished after its FIN was read).
        PeerState::Reset
    } else if fd.revents & libc::POLLRDHUP != 0 {
        PeerState::Closed
    } else {
        PeerState::Open
    }
}

/// Elsewhere the keepalive ping is what notices a stalled peer's end.
#[cfg(not(target_os = "linux"))]
pub fn peer_state(_tcp: &TcpStream) -> PeerState {
    PeerState::Open
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    /// Polls until the state changes from `Open` (the kernel delivers the peer's FIN or
    /// reset asynchronously), with a generous bound.
    async fn settled(tcp: &TcpStream) -> PeerState {
        for _ in 0..1000 {
            let state = peer_state(tcp);
            if state != PeerState::Open {
                return state;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        peer_state(tcp)
    }

    #[tokio::test]
    async fn unread_data_is_not_an_end() {
        let (mut a, b) = pair().await;
        a.write_all(b"unread").await.expect("write");
        a.flush().await.expect("flush");
        // Give the bytes time to land; the state must stay Open throughout.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(peer_state(&b), PeerState::Open);
    }

    #[tokio::test]
    async fn a_fin_behind_unread_data_is_closed_and_the_data_still_reads() {
        let (mut a, mut b) = pair().await;
        a.write_all(b"last words").await.expect("write");
        a.shutdown().await.expect("shutdown");
        assert_eq!(settled(&b).await, PeerState::Closed);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_reset_is_reset() {
        let (a, b) = pair().await;
        // SO_LINGER 0: closing sends a reset instead of a FIN.
        a.set_zero_linger().expect("SO_LINGER 0");
        drop(a);
        assert_eq!(settled(&b).await, PeerState::Reset);
    }
}
