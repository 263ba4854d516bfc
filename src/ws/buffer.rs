//! Relay buffers, borrowed only while bytes are in flight: an idle tunnel holds none.
//!
//! Each worker thread keeps a small free list, so borrowing and returning a buffer is a
//! `Vec::pop`/`push` with no locking; a buffer returned on another thread simply moves there.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Size of one relay buffer. 32 KiB holds a 16 KiB message with its header in one read
/// and lets a burst of small frames go out in one write, while 1,000 busy connections
/// still need only ~64 MiB for both directions.
pub const RELAY_BUF_SIZE: usize = 32 * 1024;

/// Free buffers kept per worker thread; beyond this they go back to the allocator, so
/// a traffic burst does not pin memory forever.
const MAX_FREE_PER_THREAD: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A borrowed relay buffer; returns to the current thread's free list on drop.
pub struct RelayBuf(Option<Box<[u8]>>);

impl RelayBuf {
    pub fn take() -> RelayBuf {
        let reused = FREE.with(|free| free.borrow_mut().pop());
        RelayBuf(Some(
            reused.unwrap_or_else(|| vec![0u8; RELAY_BUF_SIZE].into_boxed_slice()),
        ))
    }
}

impl Drop for RelayBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            // During thread teardown the free list may be gone; then the buffer is just freed.
            let _ = FREE.try_with(|free| {
                let mut free = free.borrow_mut();
                if free.len() < MAX_FREE_PER_THREAD {
                    free.push(buf);
                }
            });
        }
    }
}

impl Deref for RelayBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for RelayBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}
