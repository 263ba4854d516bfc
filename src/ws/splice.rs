//! Zero-copy relaying of large frames between two plain TCP sockets (Linux `splice(2)`).
//!
//! When a direction carries large data frames, the relay peeks at the next frame header
//! instead of reading it, and moves the whole frame (header and payload, unchanged, masks
//! included) from the source socket into a pipe and from the pipe into the destination
//! socket. The kernel hands over page references: the payload is never copied into wsgate's
//! memory. Pipes are borrowed from a small per-thread pool only while a frame is in flight,
//! like relay buffers, so an idle tunnel holds none.

use std::io;
use std::task::{Context, Poll};

use tokio::io::{DuplexStream, Interest};
use tokio::net::TcpStream;

use crate::ws::buffer::RELAY_BUF_SIZE;

/// Frames at least this large (header included) are spliced once the direction has seen one:
/// frames that do not fit one relay buffer, so the ordinary path would need two reads and two
/// writes for them anyway. Smaller frames are cheaper through the buffer: the splice path
/// makes four system calls per frame (header peek, splice in, splice out, and a peek that
/// finds the socket drained) where the ordinary path makes two (benchmarked in
/// docs/performance.md).
pub const SPLICE_MIN_FRAME: u64 = RELAY_BUF_SIZE as u64;

/// A frame's payload still to come, behind a header that was read through the relay buffer,
/// is spliced when it is at least this large: moving it then takes two system calls (into
/// the pipe and out of it), as reading and writing it would, without the copies.
pub const SPLICE_MIN_REST: u64 = 16 * 1024;

/// Capacity asked for each pipe: a 256 KiB frame crosses in one splice each way. When the
/// system refuses (the per-user pipe limits), the default of 64 KiB is used.
#[cfg(target_os = "linux")]
const PIPE_CAPACITY: usize = 256 * 1024;

/// Free pipes kept per worker thread; beyond this they are closed.
#[cfg(target_os = "linux")]
const MAX_FREE_PER_THREAD: usize = 16;

/// A stream the relay can splice from and to: a plain TCP socket.
pub trait SpliceIo {
    /// The socket, when this stream is plain TCP (not TLS, not in-process).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    /// The TCP socket under this stream, TLS or not: for readiness queries only, never
    /// for bytes (see [`crate::ws::peer`]).
    fn socket(&self) -> Option<&TcpStream> {
        self.tcp()
    }
}

impl SpliceIo for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl SpliceIo for DuplexStream {}

impl<T: SpliceIo> SpliceIo for Box<T> {
    fn tcp(&self) -> Option<&TcpStream> {
        (**self).tcp()
    }

    fn socket(&self) -> Option<&TcpStream> {
        (**self).socket()
    }
}

impl SpliceIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
}

impl<T> SpliceIo for hyper_util::rt::TokioIo<T> {}

/// Whether this system can splice between sockets at all.
pub const SUPPORTED: bool = cfg!(target_os = "linux");

#[cfg(target_os = "linux")]
mod sys {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use super::{MAX_FREE_PER_THREAD, PIPE_CAPACITY};

    /// An empty pipe, both ends non-blocking.
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        capacity: usize,
    }

    /// A pipe's capacity when nobody changed it: 16 pages.
    const DEFAULT_CAPACITY: usize = 16 * 4096;

    thread_local! {
        static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    impl Pipe {
        /// A pipe from this thread's pool, or a new one.
        pub fn take() -> io::Result<Pipe> {
            if let Some(pipe) = FREE.with(|free| free.borrow_mut().pop()) {
                return Ok(pipe);
            }
            let mut fds: [libc::c_int; 2] = [-1; 2];
            // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 requires; the
            // flags are valid for pipe2.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else;
            // each is wrapped exactly once.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours; the
            // descriptor is open (owned by `write`).
            let set = unsafe {
                libc::fcntl(
                    write.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    PIPE_CAPACITY as libc::c_int,
                )
            };
            // On success the kernel answers with the capacity it gave. The capacity only
            // sizes requests: a splice moves what fits, and says how much.
            let capacity = usize::try_from(set).unwrap_or(DEFAULT_CAPACITY);
            Ok(Pipe {
                read,
                write,
                capacity,
            })
        }

        /// Bytes the pipe holds at most.
        pub fn capacity(&self) -> usize {
            self.capacity
        }

        /// Returns an empty pipe to this thread's pool (a pipe with data in it must be
        /// dropped instead: the next borrower would relay those bytes).
        pub fn put_back(self) {
            // During thread teardown the pool may be gone; then the pipe is just closed.
            let _ = FREE.try_with(|free| {
                let mut free = free.borrow_mut();
                if free.len() < MAX_FREE_PER_THREAD {
                    free.push(self);
                }
            });
        }

        pub fn read_fd(&self) -> RawFd {
            self.read.as_raw_fd()
        }

        pub fn write_fd(&self) -> RawFd {
            self.write.as_raw_fd()
        }
    }

    /// Copies up to `buf.len()` bytes from the front of the socket's receive queue without
    /// consuming them.
    pub fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call, and recv
        // writes at most that many.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Moves up to `len` bytes from `from` to `to` (one of them a pipe) without copying.
    pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: splice only reads and writes kernel objects named by the descriptors; the
        // null offsets mean "current position", which pipes and sockets require.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;

    /// Never constructed: splicing is Linux only.
    pub enum Pipe {}

    impl Pipe {
        pub fn take() -> io::Result<Pipe> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub fn put_back(self) {}
        pub fn capacity(&self) -> usize {
            match *self {}
        }
    }
}

pub use sys::Pipe;

/// Runs `op` on `tcp` when it is ready for `interest`; registers the task's waker and
/// returns `Pending` when it is not.
#[cfg(target_os = "linux")]
fn poll_io(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    mut op: impl FnMut(std::os::fd::RawFd) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    loop {
        let ready = if interest.is_readable() {
            tcp.poll_read_ready(cx)
        } else {
            tcp.poll_write_ready(cx)
        };
        if let Err(e) = std::task::ready!(ready) {
            return Poll::Ready(Err(e));
        }
        match tcp.try_io(interest, || op(fd)) {
            // try_io cleared the readiness: the next poll registers the waker.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

/// Peeks at up to `buf.len()` bytes of `tcp`'s input.
pub fn poll_peek(tcp: &TcpStream, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
    #[cfg(target_os = "linux")]
    {
        poll_io(tcp, cx, Interest::READABLE, |fd| sys::peek(fd, buf))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tcp, cx, buf);
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

/// Which way a splice moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// From the socket's input into the pipe.
    In,
    /// From the pipe to the socket's output.
    Out,
}

/// Moves up to `len` bytes between `tcp` and `pipe`, the way `flow` says.
pub fn poll_splice(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    pipe: &Pipe,
    flow: Flow,
    len: usize,
) -> Poll<io::Result<usize>> {
    #[cfg(target_os = "linux")]
    {
        let interest = match flow {
            Flow::In => Interest::READABLE,
            Flow::Out => Interest::WRITABLE,
        };
        poll_io(tcp, cx, interest, |fd| match flow {
            Flow::In => sys::splice(fd, pipe.write_fd(), len),
            Flow::Out => sys::splice(pipe.read_fd(), fd, len),
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tcp, cx, flow, len);
        match *pipe {}
    }
}
