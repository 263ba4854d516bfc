//! The admin listener: Prometheus metrics, health and readiness, the live connection list,
//! closing one connection, reload, and the status page with its data (`status`). Never on
//! a public port unless configured so, and then only with `token_file`.

pub mod status;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::gateway::Shared;
use crate::proxy::head::percent_decode;
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
            let events_stop = stop.clone();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let reload = reload.clone();
                let stop = events_stop.clone();
                async move {
                    let refusal = cross_site_refusal(&req).or_else(|| token_refusal(&req, &shared));
                    if let Some(refusal) = refusal {
                        return Ok::<_, Infallible>(refusal.map(Either::Left));
                    }
                    if req.uri().path() == "/events" && req.method() == Method::GET {
                        return Ok(events(shared, stop));
                    }
                    if req.uri().path() == "/reload" && req.method() == Method::POST {
                        return Ok(reload_now(reload).await.map(Either::Left));
                    }
                    Ok(route(req, &shared).map(Either::Left))
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

/// Mutations (anything but GET and HEAD) from another site are refused with 403, so a web
/// page in an operator's browser cannot close connections or reload through an admin
/// listener it can reach: `Sec-Fetch-Site: cross-site`, or an `Origin` that is not this
/// listener's own (`http://` and the request's `Host`). A request with neither (curl, a
/// script) passes.
fn cross_site_refusal<B>(req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return None;
    }
    let headers = req.headers();
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Some(text(
            StatusCode::FORBIDDEN,
            "cross-site request refused: Sec-Fetch-Site is cross-site\n",
        ));
    }
    let origin = headers.get(header::ORIGIN)?;
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|host| format!("http://{host}"));
    match (origin.to_str(), own) {
        (Ok(origin), Some(own)) if origin.eq_ignore_ascii_case(&own) => None,
        (origin, _) => Some(text(
            StatusCode::FORBIDDEN,
            &format!(
                "cross-site request refused: Origin {} is not this admin listener\n",
                origin.unwrap_or("(not text)")
            ),
        )),
    }
}

/// The status page: HTML, CSS and JavaScript in one file, no external assets.
const PAGE: &str = include_str!("page.html");

/// Endpoints that stay open with `token_file`: Prometheus and the kubelet cannot send it.
const OPEN_PATHS: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

/// With `[admin] token_file`, every endpoint but [`OPEN_PATHS`] needs
/// `Authorization: Bearer TOKEN`: 401 otherwise. The page's 401 carries the page itself,
/// which then asks for the token and sends it with every call.
fn token_refusal<B>(req: &Request<B>, shared: &Shared) -> Option<Response<Full<Bytes>>> {
    let gateway = shared.gateway.load();
    let token = gateway.admin_token.as_ref()?;
    if OPEN_PATHS.contains(&req.uri().path()) {
        return None;
    }
    let offered = crate::auth::jwt::bearer(req.headers());
    if offered.is_some_and(|t| same_secret(t.as_bytes(), &token.0)) {
        return None;
    }
    let mut response = if req.uri().path() == "/" && req.method() == Method::GET {
        page()
    } else {
        text(
            StatusCode::UNAUTHORIZED,
            "this admin listener needs its token: send Authorization: Bearer TOKEN (the contents of admin.token_file)\n",
        )
    };
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"wsgate admin\""),
    );
    Some(response)
}

/// Compares without stopping at the first difference, so response times do not tell how
/// much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /`.
fn page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Nothing is loaded from anywhere, and no other site may frame the close buttons.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// The body of any admin answer: a whole text or JSON, or the event stream.
type AdminBody = Either<Full<Bytes>, status::EventStream>;

/// `GET /events`.
fn events(shared: Arc<Shared>, stop: CancellationToken) -> Response<AdminBody> {
    let mut response = Response::new(Either::Right(status::EventStream::new(shared, stop)));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
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
        "/" => only(method, &Method::GET, page),
        "/status" => only(method, &Method::GET, || {
            json(StatusCode::OK, &status::view(shared))
        }),
        "/events" => only(method, &Method::GET, || {
            text(StatusCode::INTERNAL_SERVER_ERROR, "unreachable\n")
        }),
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
            let query = match ListQuery::parse(req.uri().query().unwrap_or("")) {
                Ok(query) => query,
                Err(problem) => return text(StatusCode::BAD_REQUEST, &format!("{problem}\n")),
            };
            let records = shared.connections.snapshot();
            let mut list: Vec<ConnectionView> = records
                .iter()
                .map(|r| ConnectionView::of(r))
                .filter(|c| query.keeps(c))
                .collect();
            let total = list.len();
            query.sort(&mut list);
            let page: Vec<ConnectionView> = list
                .into_iter()
                .skip(query.offset)
                .take(query.limit)
                .collect();
            let mut response = json(StatusCode::OK, &page);
            response
                .headers_mut()
                .insert("x-total-count", HeaderValue::from(total));
            response
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

/// `GET /connections?route=&client=&sort=&limit=&offset=`: which connections, in which
/// order, which page of them.
#[derive(Debug, PartialEq)]
struct ListQuery {
    /// Only this route's connections.
    route: Option<String>,
    /// Only clients whose address (`IP:port`) starts with this.
    client: Option<String>,
    sort: SortKey,
    descending: bool,
    limit: usize,
    offset: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    Id,
    Age,
    Idle,
    Bytes,
    Frames,
    PingRtt,
    Route,
    Client,
    Listener,
    Server,
    HttpVersion,
    Subprotocol,
    BytesClientToUpstream,
    BytesUpstreamToClient,
    FramesClientToUpstream,
    FramesUpstreamToClient,
}

impl SortKey {
    const NAMES: &'static str = "id, age, idle, bytes, frames, ping_rtt, route, client, listener, server, http_version, subprotocol, bytes_client_to_upstream, bytes_upstream_to_client, frames_client_to_upstream, frames_upstream_to_client";

    fn parse(name: &str) -> Option<SortKey> {
        Some(match name {
            "id" => SortKey::Id,
            "age" => SortKey::Age,
            "idle" => SortKey::Idle,
            "bytes" => SortKey::Bytes,
            "frames" => SortKey::Frames,
            "ping_rtt" => SortKey::PingRtt,
            "route" => SortKey::Route,
            "client" => SortKey::Client,
            "listener" => SortKey::Listener,
            "server" | "upstream" => SortKey::Server,
            "http_version" => SortKey::HttpVersion,
            "subprotocol" => SortKey::Subprotocol,
            "bytes_client_to_upstream" => SortKey::BytesClientToUpstream,
            "bytes_upstream_to_client" => SortKey::BytesUpstreamToClient,
            "frames_client_to_upstream" => SortKey::FramesClientToUpstream,
            "frames_upstream_to_client" => SortKey::FramesUpstreamToClient,
            _ => return None,
        })
    }
}

impl Default for ListQuery {
    /// Every connection, oldest first.
    fn default() -> Self {
        ListQuery {
            route: None,
            client: None,
            sort: SortKey::Id,
            descending: false,
            limit: usize::MAX,
            offset: 0,
        }
    }
}

impl ListQuery {
    /// Reads the query string; a problem is a one-line answer for a 400.
    fn parse(query: &str) -> Result<ListQuery, String> {
        let mut out = ListQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)
                .ok_or_else(|| format!("invalid percent-encoding in {name}"))?;
            let number = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| format!("invalid {name} {v:?}: expected a whole number"))
            };
            match name {
                "route" => out.route = Some(value),
                "client" => out.client = Some(value),
                "sort" => {
                    let (descending, key) = match value.strip_prefix('-') {
                        Some(key) => (true, key),
                        None => (false, value.as_str()),
                    };
                    out.sort = SortKey::parse(key).ok_or_else(|| {
                        format!(
                            "invalid sort {value:?}: expected one of {} (- for descending)",
                            SortKey::NAMES
                        )
                    })?;
                    out.descending = descending;
                }
                "limit" => out.limit = number(&value)?,
                "offset" => out.offset = number(&value)?,
                _ => {
                    return Err(format!(
                        "unknown parameter {name:?}: expected route, client, sort, limit or offset"
                    ))
                }
            }
        }
        Ok(out)
    }

    fn keeps(&self, c: &ConnectionView) -> bool {
        self.route.as_deref().is_none_or(|r| r == c.route)
            && self
                .client
                .as_deref()
                .is_none_or(|prefix| c.client.starts_with(prefix))
    }

    fn sort(&self, list: &mut [ConnectionView]) {
        let key = self.sort;
        list.sort_by(|a, b| {
            let order = match key {
                SortKey::Id => a.id.cmp(&b.id),
                SortKey::Age => a.age_seconds.total_cmp(&b.age_seconds),
                SortKey::Idle => a.idle_seconds.total_cmp(&b.idle_seconds),
                SortKey::Bytes => a.bytes().cmp(&b.bytes()),
                SortKey::Frames => a.frames().cmp(&b.frames()),
                // Connections without a measured round trip sort first.
                SortKey::PingRtt => a
                    .ping_rtt_ms
                    .unwrap_or(-1.0)
                    .total_cmp(&b.ping_rtt_ms.unwrap_or(-1.0)),
                SortKey::Route => a.route.cmp(b.route),
                SortKey::Client => a.client.cmp(&b.client),
                SortKey::Listener => a.listener.cmp(b.listener),
                SortKey::Server => (a.upstream, a.server).cmp(&(b.upstream, b.server)),
                SortKey::HttpVersion => a.http_version.cmp(b.http_version),
                SortKey::Subprotocol => a.subprotocol.cmp(&b.subprotocol),
                SortKey::BytesClientToUpstream => {
                    a.bytes_client_to_upstream.cmp(&b.bytes_client_to_upstream)
                }
                SortKey::BytesUpstreamToClient => {
                    a.bytes_upstream_to_client.cmp(&b.bytes_upstream_to_client)
                }
                SortKey::FramesClientToUpstream => a
                    .frames_client_to_upstream
                    .cmp(&b.frames_client_to_upstream),
                SortKey::FramesUpstreamToClient => a
                    .frames_upstream_to_client
                    .cmp(&b.frames_upstream_to_client),
            }
            .then(a.id.cmp(&b.id));
            if self.descending {
                order.reverse()
            } else {
                order
            }
        });
    }
}

impl ConnectionView<'_> {
    fn bytes(&self) -> u64 {
        self.bytes_client_to_upstream + self.bytes_upstream_to_client
    }

    fn frames(&self) -> u64 {
        self.frames_client_to_upstream + self.frames_upstream_to_client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_parse_and_refuse_with_a_reason() {
        let q = ListQuery::parse("route=chat&client=10.0.0.%3A&sort=-bytes&limit=20&offset=40")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.route.as_deref(), Some("chat"));
        assert_eq!(q.client.as_deref(), Some("10.0.0.:"));
        assert_eq!((q.sort, q.descending), (SortKey::Bytes, true));
        assert_eq!((q.limit, q.offset), (20, 40));
        let all = ListQuery::parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                all.route,
                all.client,
                all.sort,
                all.descending,
                all.limit,
                all.offset
            ),
            (None, None, SortKey::Id, false, usize::MAX, 0)
        );
        for (query, problem) in [
            ("sort=size", "invalid sort \"size\": expected one of id, age, idle, bytes, frames, ping_rtt, route, client, listener, server, http_version, subprotocol, bytes_client_to_upstream, bytes_upstream_to_client, frames_client_to_upstream, frames_upstream_to_client (- for descending)"),
            ("limit=ten", "invalid limit \"ten\": expected a whole number"),
            ("offset=-1", "invalid offset \"-1\": expected a whole number"),
            ("page=2", "unknown parameter \"page\": expected route, client, sort, limit or offset"),
            ("route=%zz", "invalid percent-encoding in route"),
        ] {
            assert_eq!(ListQuery::parse(query), Err(problem.to_string()), "{query}");
        }
    }
}
