//! The builtin echo route (`builtin = "echo"`): a real WebSocket client (tokio-tungstenite)
//! gets every message back, pings answered and its close echoed; a raw client checks that
//! fragments come back as the same fragments; a plain GET is told to upgrade (426).

mod support;
mod wsraw;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use support::{
    assert_same_messages, http_request, next_data, pattern, raw_exchange, spawn_proxy, within,
    ws_connect, Proxy, TestDir, RELAXED_TIMEOUTS,
};
use wsraw::{encode, op, random_mask};

async fn echo_proxy(dir: &TestDir) -> Proxy {
    let toml = format!(
        r#"
[admin]
bind = "127.0.0.1:0"
[listeners.public]
bind = "127.0.0.1:0"
{RELAXED_TIMEOUTS}
[routes.echo]
path = "/echo"
builtin = "echo"
"#
    );
    spawn_proxy(&toml, dir).await
}

fn echo_url(proxy: &Proxy) -> String {
    format!("ws://{}/echo", proxy.addr("public"))
}

#[tokio::test]
async fn text_and_a_1mib_binary_come_back() {
    let dir = TestDir::new();
    let proxy = echo_proxy(&dir).await;
    let (mut ws, _) = ws_connect(echo_url(&proxy)).await;
    let messages = [
        Message::text("hello, echo ✓"),
        Message::binary(pattern(1 << 20)),
        Message::text(""),
        Message::binary(Vec::new()),
    ];
    let mut echoes = Vec::new();
    for message in &messages {
        within("sending a message", ws.send(message.clone()))
            .await
            .expect("send");
        echoes.push(next_data(&mut ws).await);
    }
    assert_same_messages("echoes", &echoes, &messages);
}

#[tokio::test]
async fn ping_is_answered_with_a_pong() {
    let dir = TestDir::new();
    let proxy = echo_proxy(&dir).await;
    let (mut ws, _) = ws_connect(echo_url(&proxy)).await;
    within(
        "sending a ping",
        ws.send(Message::Ping("are you there".into())),
    )
    .await
    .expect("send a ping");
    let answer = within("the pong", ws.next()).await;
    match answer {
        Some(Ok(Message::Pong(payload))) => assert_eq!(&payload[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[tokio::test]
async fn close_4000_is_echoed_and_the_stream_ends() {
    let dir = TestDir::new();
    let proxy = echo_proxy(&dir).await;
    let (mut ws, _) = ws_connect(echo_url(&proxy)).await;
    within(
        "sending a close",
        ws.close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "bye".into(),
        })),
    )
    .await
    .expect("send a close");
    let answer = within("the echoed close", ws.next()).await;
    match answer {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 4000);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => panic!("expected the close echoed, got {other:?}"),
    }
    let end = within("the end of the stream", ws.next()).await;
    assert!(end.is_none(), "expected the stream to end, got {end:?}");
}

#[tokio::test]
async fn fragments_come_back_as_the_same_fragments() {
    let dir = TestDir::new();
    let proxy = echo_proxy(&dir).await;
    let mut client = wsraw::connect(proxy.addr("public"), "/echo").await;
    let sent = [
        (false, op::TEXT, &b"one, "[..]),
        (false, op::CONTINUATION, &b"two, "[..]),
        (true, op::CONTINUATION, &b"three"[..]),
    ];
    for (fin, opcode, payload) in sent {
        client
            .send(&encode(fin, 0, opcode, payload, Some(random_mask())))
            .await;
    }
    for (i, (fin, opcode, payload)) in sent.into_iter().enumerate() {
        let frame = client.frame("an echoed fragment").await;
        assert_eq!(
            (
                frame.fin,
                frame.opcode,
                frame.rsv,
                frame.mask,
                &frame.payload[..]
            ),
            (fin, opcode, 0, None, payload),
            "fragment {i}: {frame:?}"
        );
    }
    // A close echoed byte for byte (unmasked), then the end of the connection.
    client.send(&wsraw::client_close(4000, "bye")).await;
    let close = client.frame("the echoed close").await;
    assert_eq!(close.raw, wsraw::server_close(4000, "bye"));
    let (frames, ended) = client.until_eof("the end of the connection").await;
    assert_eq!((frames, ended), (vec![], wsraw::Ended::Eof));
}

#[tokio::test]
async fn plain_get_is_told_to_upgrade() {
    let dir = TestDir::new();
    let proxy = echo_proxy(&dir).await;
    let addr = proxy.addr("public");
    let host = addr.to_string();
    let response = raw_exchange(
        addr,
        &http_request("GET", "/echo", &[("Host", &host), ("Connection", "close")]),
    )
    .await;
    assert_eq!(response.status, 426, "{:?}", response.head);
    assert_eq!(
        response.header("upgrade").map(str::to_ascii_lowercase),
        Some("websocket".to_string()),
        "a 426 must say which protocol to upgrade to"
    );
}

#[tokio::test]
async fn rsv_bits_without_an_extension_are_a_protocol_error() {
    let dir = TestDir::new();
    let proxy = echo_proxy(&dir).await;
    let mut client = wsraw::connect(proxy.addr("public"), "/echo").await;
    // RSV1 on a text frame: nothing was negotiated on the builtin echo to give it a meaning.
    client
        .send(&encode(
            true,
            0b100,
            op::TEXT,
            b"compressed?",
            Some(random_mask()),
        ))
        .await;
    let close = client.frame("the close for RSV bits").await;
    assert_eq!(close.close(), (1002, "protocol error".to_string()));
}
