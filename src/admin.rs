//! The admin listener: Prometheus metrics, health and readiness, the live connection list,
//! closing one connection, and reload. Never on a public port unless configured so.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::gateway::Shared;
use crate::reload::Reloader;
use crate::ws::record::{CloseRequest, ConnRecord};

/// Time an admin client has to send its request head; the admin API is for tools on a
/// trusted network, so a short bound only protects against stuck scrapers.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin API until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    reload: Option<Arc<Reloader>>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    // Out of descriptors or similar: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let reload = reload.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let reload = reload.clone();
                async move {
                    if req.uri().path() == "/reload" && req.method() == Method::POST {
                        return Ok::<_, Infallible>(reload_now(reload).await);
                    }
                    Ok::<_, Infallible>(route(req, &shared))
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = result {
                debug!(client = %peer, error = %e, "admin connection error");
            }
        });
    }
}

/// `POST /reload`: file reads and certificate parsing run off the async workers.
async fn reload_now(reload: Option<Arc<Reloader>>) -> Response<Full<Bytes>> {
    let Some(reload) = reload else {
        return text(StatusCode::NOT_IMPLEMENTED, "reload is not available\n");
    };
    match tokio::task::spawn_blocking(move || reload.reload()).await {
        Ok(Ok(notes)) => {
            let mut body = String::from("reloaded\n");
            for note in notes {
                body.push_str(&note);
                body.push('\n');
            }
            text(StatusCode::OK, &body)
        }
        Ok(Err(e)) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reload failed: {e}\n"),
        ),
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/metrics" => only(method, &Method::GET, || {
            let mut response = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }),
        "/healthz" => only(method, &Method::GET, || text(StatusCode::OK, "ok\n")),
        "/readyz" => only(method, &Method::GET, || {
            if shared.shutdown.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }),
        "/connections" => only(method, &Method::GET, || {
            let records = shared.connections.snapshot();
            let list: Vec<ConnectionView> = records.iter().map(|r| ConnectionView::of(r)).collect();
            json(StatusCode::OK, &list)
        }),
        // POST is answered before routing; any other method lands here.
        "/reload" => only(method, &Method::POST, || {
            text(StatusCode::INTERNAL_SERVER_ERROR, "unreachable\n")
        }),
        _ => match path.strip_prefix("/connections/") {
            Some(id) => only(method, &Method::DELETE, || close_connection(shared, id)),
            None => text(
                StatusCode::NOT_FOUND,
                &format!("no admin endpoint at {path}\n"),
            ),
        },
    }
}

/// Runs `handler` for `allowed`, answers 405 with `Allow` otherwise.
fn only(
    method: &Method,
    allowed: &Method,
    handler: impl FnOnce() -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if method == allowed || (allowed == Method::GET && method == Method::HEAD) {
        return handler();
    }
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} not allowed here; use {allowed}\n"),
    );
    if let Ok(value) = HeaderValue::from_str(allowed.as_str()) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

fn close_connection(shared: &Shared, id: &str) -> Response<Full<Bytes>> {
    let Ok(id) = id.parse::<u64>() else {
        return text(
            StatusCode::NOT_FOUND,
            &format!("no connection with id {id:?}\n"),
        );
    };
    match shared.connections.get(id) {
        Some(record) => {
            record.request_close(CloseRequest::Operator);
            text(StatusCode::OK, &format!("closing connection {id}\n"))
        }
        None => text(
            StatusCode::NOT_FOUND,
            &format!("no connection with id {id}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

/// One entry of `GET /connections`.
#[derive(Debug, Serialize)]
struct ConnectionView<'a> {
    id: u64,
    client: String,
    listener: &'a str,
    route: &'a str,
    /// The upstream's name; `null` for builtin routes.
    upstream: Option<&'a str>,
    /// The upstream server's address.
    server: Option<&'a str>,
    http_version: &'a str,
    subprotocol: Option<&'a str>,
    age_seconds: f64,
    idle_seconds: f64,
    bytes_client_to_upstream: u64,
    bytes_upstream_to_client: u64,
    frames_client_to_upstream: u64,
    frames_upstream_to_client: u64,
    ping_rtt_ms: Option<f64>,
}

impl<'a> ConnectionView<'a> {
    fn of(r: &'a ConnRecord) -> Self {
        let age = r.identity.started.elapsed().as_secs_f64();
        let last = r.last_activity_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        ConnectionView {
            id: r.identity.id,
            client: r.identity.client.to_string(),
            listener: &r.identity.listener,
            route: &r.identity.route,
            upstream: r.identity.upstream.as_deref(),
            server: r.identity.server.as_deref(),
            http_version: r.identity.http_version,
            subprotocol: r.identity.subprotocol.as_deref(),
            age_seconds: age,
            idle_seconds: (age - last).max(0.0),
            bytes_client_to_upstream: r.client_to_upstream.bytes.load(Ordering::Relaxed),
            bytes_upstream_to_client: r.upstream_to_client.bytes.load(Ordering::Relaxed),
            frames_client_to_upstream: r.client_to_upstream.frames.load(Ordering::Relaxed),
            frames_upstream_to_client: r.upstream_to_client.frames.load(Ordering::Relaxed),
            ping_rtt_ms: r.ping_rtt_ms(),
        }
    }
}
