//! The builtin echo endpoint (`builtin = "echo"`): wsgate answers the upgrade itself.

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::gateway::{ConnContext, Route, Shared};
use crate::proxy::body::ProxyBody;
use crate::proxy::handshake;

/// Answers the upgrade with 101 and spawns the echo loop on the upgraded socket.
pub fn accept(
    _req: Request<Incoming>,
    _route: &Route,
    _conn: &ConnContext,
    _shared: &Shared,
    key: &HeaderValue,
) -> Response<ProxyBody> {
    handshake::switching_protocols(key)
}
