//! The one response body type wsgate serves: a short text of its own, or an upstream's
//! streamed body that hands its pooled connection back once fully read.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::proxy::upgrade::RawBody;
use crate::upstream::PooledSender;

/// What a body can fail with: hyper's errors, or the socket's under a raw body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: wsgate's own short answers, or an upstream body streamed through.
pub enum ProxyBody {
    /// A body wsgate wrote itself (refusal texts); `None` once sent.
    Text(Option<Bytes>),
    /// An upstream's body; the connection it came on goes back to the pool when the body ends.
    Upstream {
        body: Incoming,
        conn: Option<PooledSender>,
    },
    /// A refused upgrade's body, read off the upstream socket by wsgate itself.
    Raw(Box<RawBody>),
}

impl ProxyBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        ProxyBody::Text(Some(s.into()))
    }

    pub fn empty() -> Self {
        ProxyBody::Text(None)
    }

    pub fn upstream(body: Incoming, conn: Option<PooledSender>) -> Self {
        ProxyBody::Upstream { body, conn }
    }

    pub fn raw(body: RawBody) -> Self {
        ProxyBody::Raw(Box::new(body))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Text(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream { body, conn } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    if let Some(conn) = conn.take() {
                        conn.release();
                    }
                }
                polled.map(|frame| frame.map(|r| r.map_err(BodyError::from)))
            }
            ProxyBody::Raw(body) => body
                .poll_frame(cx)
                .map(|frame| frame.map(|r| r.map_err(BodyError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Text(data) => data.is_none(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Raw(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Text(Some(data)) => SizeHint::with_exact(data.len() as u64),
            ProxyBody::Text(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Raw(body) => match body.exact_len() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body that was never polled to its end (HEAD, 204, 304) but is complete still
        // leaves a reusable connection; one abandoned mid-way does not, and is closed.
        if let ProxyBody::Upstream { body, conn } = self {
            if let Some(conn) = conn.take() {
                if body.is_end_stream() {
                    conn.release();
                }
            }
        }
    }
}
