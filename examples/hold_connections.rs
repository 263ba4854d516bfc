//! Opens N WebSockets to a URL (64 handshakes at a time), sends one message on each, then
//! holds them all open and silent until SIGINT. Prints
//! "holding N" once every connection is open. Used by benches/status-page-cost.sh.
//!
//! cargo run --release --example hold_connections -- ws://127.0.0.1:8080/echo 5000

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(count)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: hold_connections URL COUNT");
    };
    let count: usize = count.parse()?;
    let mut held = Vec::with_capacity(count);
    let mut opened = 0;
    while opened < count {
        let batch = (count - opened).min(64);
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
                ws.send(Message::text("hello")).await?;
                ws.next().await;
                anyhow::Ok(ws)
            }));
        }
        for task in tasks {
            held.push(task.await??);
        }
        opened += batch;
    }
    println!("holding {}", held.len());
    // Keep every connection open (answering pings) until SIGINT.
    let keepalive = tokio::spawn(async move {
        let mut streams = futures_util::stream::select_all(held.into_iter().map(|ws| ws.boxed()));
        while streams.next().await.is_some() {}
    });
    tokio::signal::ctrl_c().await?;
    keepalive.abort();
    Ok(())
}
