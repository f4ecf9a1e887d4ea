//! Buffers given back by idle connections, kept per thread for the next
//! connection that needs one (a remora patch, see `vendor/README.md`).
//!
//! An idle connection (no streams, nothing buffered) gives back its read and
//! write buffers, so that thousands of idle connections hold none. A
//! connection that goes idle between every request, as most do at a sidecar's
//! load, then takes them back at the next request: from here, not from the
//! allocator. At most `KEEP` of each are kept per thread.

use bytes::BytesMut;
use std::cell::RefCell;
use std::thread::LocalKey;

const KEEP: usize = 4;

pub(crate) type Pool = LocalKey<RefCell<Vec<BytesMut>>>;

thread_local! {
    pub(crate) static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    pub(crate) static WRITE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with room for at least `capacity / 2` bytes: a pooled one, or a
/// new one of `capacity`.
pub(crate) fn take(pool: &'static Pool, capacity: usize) -> BytesMut {
    pool.try_with(|p| p.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(capacity))
}

/// Gives back an empty buffer; kept if its room is between `capacity / 2` and
/// `capacity * 4` and the pool has space, else freed.
pub(crate) fn give(pool: &'static Pool, mut buf: BytesMut, capacity: usize) {
    buf.clear();
    let room = buf.capacity();
    if room < capacity / 2 || room > capacity * 4 {
        return;
    }
    let mut buf = Some(buf);
    let _ = pool.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < KEEP {
                p.extend(buf.take());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_keep_buffers_of_a_useful_size() {
        for _ in 0..KEEP + 2 {
            give(&WRITE, BytesMut::with_capacity(1024), 1024);
        }
        give(&WRITE, BytesMut::with_capacity(100), 1024);
        give(&WRITE, BytesMut::with_capacity(1 << 20), 1024);
        let n = WRITE.with(|p| p.borrow().len());
        assert_eq!(n, KEEP);
        assert!(WRITE.with(|p| p.borrow().iter().all(|b| b.capacity() == 1024)));
        for _ in 0..KEEP + 1 {
            assert!(take(&WRITE, 1024).capacity() >= 512);
        }
        assert_eq!(WRITE.with(|p| p.borrow().len()), 0);
    }
}
