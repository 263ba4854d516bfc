//! The drain: once accepting has stopped, every WebSocket is asked to close with 1001
//! "going away", spread evenly over `drain_spread` so clients reconnect as a ramp rather
//! than a spike; plain HTTP connections finish their in-flight request; everything still
//! open after `shutdown_grace` is dropped.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::gateway::Shared;
use crate::ws::record::CloseRequest;

/// How often the drain looks for connections that were upgraded after it started (an
/// upgrade already in flight on a keep-alive connection when the drain began).
const LATE_ARRIVAL_CHECK: Duration = Duration::from_millis(100);

/// Closes everything within `timeouts.shutdown_grace`; `connections` tracks the HTTP
/// connections, `shared.tunnels` the upgraded ones.
pub async fn drain(shared: &Shared, connections: &TaskTracker) {
    let gateway = shared.gateway.load_full();
    let grace = gateway.timeouts.shutdown_grace;
    let spread = gateway.timeouts.drain_spread.min(grace);
    let started = Instant::now();
    let deadline = started + grace;
    connections.close();
    shared.tunnels.close();

    let live = shared.connections.snapshot();
    info!(
        websockets = live.len(),
        spread_ms = spread.as_millis() as u64,
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    let closer = async {
        let n = live.len().max(1) as u32;
        for (i, record) in live.iter().enumerate() {
            // Evenly spaced: the first at once, the last just before the window ends.
            tokio::time::sleep_until(started + spread * i as u32 / n).await;
            record.request_close(CloseRequest::Drain);
        }
        loop {
            for record in shared.connections.snapshot() {
                record.request_close(CloseRequest::Drain);
            }
            tokio::time::sleep(LATE_ARRIVAL_CHECK).await;
        }
    };
    let everything_closed = async {
        connections.wait().await;
        shared.tunnels.wait().await;
    };
    let finished = tokio::select! {
        _ = everything_closed => true,
        _ = closer => false,
        _ = tokio::time::sleep_until(deadline) => false,
    };
    if finished {
        info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
    } else {
        info!(
            left = shared.connections.len(),
            "grace period over, closing what is left"
        );
    }
}
