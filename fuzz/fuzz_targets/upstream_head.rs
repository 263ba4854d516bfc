//! Feeds arbitrary bytes, delivered in arbitrary pieces, to the parser of an upstream's
//! answer to a WebSocket upgrade (`read_response`, then `framing` for a refusal) and checks
//! that nothing panics or loops, that the outcome does not depend on how the bytes were cut,
//! and that an accepted head leaves exactly the bytes after it.

#![no_main]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use wsgate::proxy::upgrade::{framing, read_response, HeadError};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Piece sizes (each + 1), cycled; empty = everything in one read.
    splits: Vec<u8>,
    data: Vec<u8>,
}

/// Hands out `data` in pieces, then the end of the stream; never pending.
struct Pieces<'a> {
    data: &'a [u8],
    splits: &'a [u8],
    next: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let piece = if self.splits.is_empty() {
            self.data.len()
        } else {
            let size = usize::from(self.splits[self.next % self.splits.len()]) + 1;
            self.next += 1;
            size
        };
        let n = piece.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Head {
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        rest: Vec<u8>,
        framing: Option<String>,
    },
    Error(String),
}

fn run(data: &[u8], splits: &[u8]) -> Outcome {
    let mut reader = Pieces {
        data,
        splits,
        next: 0,
    };
    let waker = Waker::from(Arc::new(Noop));
    let mut cx = Context::from_waker(&waker);
    let mut future = Box::pin(read_response(&mut reader));
    let result = match future.as_mut().poll(&mut cx) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("pending on a reader that never is"),
    };
    drop(future);
    match result {
        Ok(head) => {
            // The bytes after the head are the input's tail (the reader may not have
            // handed out everything yet).
            let consumed = data.len() - reader.data.len();
            let rest = head.rest.to_vec();
            assert!(
                data[..consumed].ends_with(&rest),
                "rest is not what followed the head"
            );
            Outcome::Head {
                status: head.status.as_u16(),
                headers: head
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect(),
                // Compared as what it means, not as what was read past it.
                rest: Vec::new(),
                framing: Some(match framing(head.status, &head.headers) {
                    Ok(f) => format!("{f:?}"),
                    Err(e) => format!("error {e}"),
                }),
            }
        }
        Err(HeadError::Io(e)) => panic!("an in-memory reader failed: {e}"),
        // Closed vs Truncated depends only on whether any byte came: same for any cut.
        Err(e) => Outcome::Error(e.to_string()),
    }
}

fuzz_target!(|input: Input| {
    let whole = run(&input.data, &[]);
    let cut = run(&input.data, &input.splits);
    // A head that is complete is complete whatever the reads; only "too large" can differ
    // by where the buffer limit falls relative to the reads, and only on inputs over it.
    if input.data.len() < wsgate::proxy::upgrade::MAX_HEAD {
        assert_eq!(whole, cut, "the outcome depends on how the input was cut");
    }
});
