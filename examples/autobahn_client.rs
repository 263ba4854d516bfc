//! A WebSocket client for the Autobahn|Testsuite fuzzingserver, built on tokio-tungstenite:
//! `conformance/run.sh --server` runs it against the suite directly and through wsgate (the
//! suite as wsgate's upstream) and compares the verdicts case by case.
//!
//!   cargo run --example autobahn_client -- ws://127.0.0.1:9001 AGENT
//!
//! Like the suite's own reference clients it asks for the case count, runs every case
//! (echoing each text or binary message as it came, answering pings and closes), then asks
//! the suite to write its reports. A frame the library refuses is answered with the close
//! code RFC 6455 gives for it, as a browser would.

use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// Longest one case may take: the slowest cases (9.x, 12.x, 13.x) take a few seconds.
const CASE_LIMIT: Duration = Duration::from_secs(120);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(base), Some(agent)) = (args.next(), args.next()) else {
        bail!("usage: autobahn_client URL AGENT");
    };
    let base = base.trim_end_matches('/');
    let count = case_count(&format!("{base}/getCaseCount")).await?;
    eprintln!("autobahn_client: {count} cases from {base}");
    for case in 1..=count {
        let url = format!("{base}/runCase?case={case}&agent={agent}");
        if tokio::time::timeout(CASE_LIMIT, run_case(&url))
            .await
            .is_err()
        {
            eprintln!("autobahn_client: case {case} took longer than {CASE_LIMIT:?}");
        }
    }
    let url = format!("{base}/updateReports?agent={agent}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .with_context(|| format!("connect to {url}"))?;
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

async fn case_count(url: &str) -> anyhow::Result<u32> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connect to {url}"))?;
    while let Some(message) = ws.next().await {
        if let Message::Text(text) = message.context("read the case count")? {
            return text.trim().parse().context("a case count");
        }
    }
    bail!("{url} closed without a case count")
}

/// One case: echo until the connection ends.
async fn run_case(url: &str) {
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let Ok((mut ws, _)) =
        tokio_tungstenite::connect_async_with_config(url, Some(config), false).await
    else {
        return;
    };
    while let Some(next) = ws.next().await {
        let answer = match next {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => ws.send(message).await,
            // Pings are answered and closes echoed by the library itself.
            Ok(_) => Ok(()),
            Err(e) => {
                let Some(code) = close_code_for(&e) else {
                    return;
                };
                let frame = CloseFrame {
                    code,
                    reason: "".into(),
                };
                let _ = ws.close(Some(frame)).await;
                // Read the peer's answer (or its end); the library stops at the close.
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
        };
        if answer.is_err() {
            return;
        }
    }
}

/// The close code for a frame the library refused; `None` when the connection is gone.
fn close_code_for(e: &Error) -> Option<CloseCode> {
    match e {
        Error::Utf8(_) => Some(CloseCode::Invalid),
        Error::Capacity(CapacityError::MessageTooLong { .. }) => Some(CloseCode::Size),
        Error::Capacity(_) => Some(CloseCode::Size),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        Error::Protocol(_) => Some(CloseCode::Protocol),
        _ => None,
    }
}
