//! A per-thread cache of freed small blocks in front of the system allocator — haproxy's
//! "pools" and nginx's, for a Rust program: opt in with `#[global_allocator]`
//! (`remora-proxy` does) and [`pool_this_thread`] on the threads that carry requests.
//!
//! Why: every proxied request allocates and frees the same few dozen small objects (h2's
//! stream state and frames, header maps, hyper's channels, two tokio task cells). glibc keeps
//! only 7 freed blocks per size in its per-thread cache; with more requests in flight than
//! that, the rest take its bins' slow path (`_int_malloc`, `_int_free`, consolidation), about
//! 12 % of a saturated proxy's instructions. And tokio's task cells are aligned to 128 bytes:
//! glibc serves those with `posix_memalign`, never from its cache, twice per request.
//!
//! Past 1 KiB, HTTP/1.1 takes two more trips to glibc's slow path per request: hyper reads
//! each message head into an 8 KiB buffer that the head's fields keep alive, so every read
//! after it needs a fresh buffer (`_int_malloc` and `_int_free`, 4 % of a keep-alive request);
//! and the proxy's boxed request future is just over 1 KiB.
//!
//! How: sizes up to 1,032 bytes (alignment ≤ 16) and up to 4,096 bytes (alignment 32 to
//! 128) fall into classes; so do sizes up to 4,104 bytes in steps of 128 and up to 16,392 in
//! steps of 1,024 (alignment ≤ 16). Each class's blocks have one size and alignment, so any
//! freed block serves any later request of its class. A thread that opted in keeps freed
//! blocks on a free list per class — at most 256 per class (8 for the classes past 4 KiB) and
//! 1 MiB in all — and hands them out again before asking the system. The bounds are what a
//! saturated proxy needs: with 160 requests in flight (`h2load -c 16 -m 10`), 128 blocks per
//! class and 256 KiB left 1,800 instructions per request in glibc (callgrind); now 200. Everything else, and every block past those bounds, goes
//! to the system allocator as before. Blocks move freely between threads (all of them are the
//! system allocator's blocks); only the lists are per thread.
//!
//! Bounded: a thread holds at most 1 MiB it does not use. A thread that opted in
//! and then ends must call [`flush_this_thread`] first (tokio's `on_thread_stop`), or its
//! lists are lost to the process (never reused, never freed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Largest size with a class of its own for ordinary alignments (≤ 16).
const SMALL_MAX: usize = 1032;
/// Largest size with a class of its own for alignments from 32 to 128 (tokio's task cells).
const ALIGNED_MAX: usize = 4096;
/// Largest size with a class of its own in steps of 128 bytes (alignment ≤ 16).
const MID_MAX: usize = 4104;
/// Largest size with a class at all (alignment ≤ 16), in steps of 1 KiB past `MID_MAX`.
const LARGE_MAX: usize = 16392;
/// Freed blocks kept per class per thread.
const PER_CLASS: u16 = 256;
/// Freed blocks kept per class past `MID_MAX`: a few buffers in flight between a free and the
/// next read, not a reserve that would crowd the small classes out of the budget.
const PER_LARGE_CLASS: u16 = 8;
/// Bytes of freed blocks kept per thread, all classes together.
const BUDGET: usize = 1024 * 1024;

/// Block sizes of the small classes follow glibc's chunk sizes (its usable sizes are
/// 24 + 16·k), so rounding a request up to its class never takes a larger chunk.
const SMALL_FIRST: usize = 24;
const SMALL_STEP: usize = 16;
const SMALL_CLASSES: usize = (SMALL_MAX - SMALL_FIRST) / SMALL_STEP + 1;
const ALIGNED_STEP: usize = 128;
const ALIGNED_CLASSES: usize = ALIGNED_MAX / ALIGNED_STEP;
/// Sizes `SMALL_MAX + 128·k` and `8 + 1024·k`: still glibc chunk sizes.
const MID_STEP: usize = 128;
const MID_CLASSES: usize = (MID_MAX - SMALL_MAX) / MID_STEP;
const LARGE_STEP: usize = 1024;
const LARGE_FIRST_K: usize = MID_MAX / LARGE_STEP + 1;
const LARGE_CLASSES: usize = LARGE_MAX / LARGE_STEP - LARGE_FIRST_K + 1;
const MID_BASE: usize = SMALL_CLASSES + ALIGNED_CLASSES;
const LARGE_BASE: usize = MID_BASE + MID_CLASSES;
const CLASSES: usize = LARGE_BASE + LARGE_CLASSES;

/// A class: its index, and the layout every one of its blocks is allocated with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Class {
    index: usize,
    size: usize,
    align: usize,
}

fn class(size: usize, align: usize) -> Option<Class> {
    if align <= 16 && size <= SMALL_MAX {
        let index = size.saturating_sub(SMALL_FIRST).div_ceil(SMALL_STEP);
        return Some(Class {
            index,
            size: SMALL_FIRST + index * SMALL_STEP,
            align: 16,
        });
    }
    if align > 16 && align <= ALIGNED_STEP && size <= ALIGNED_MAX {
        let i = size.div_ceil(ALIGNED_STEP).max(1) - 1;
        return Some(Class {
            index: SMALL_CLASSES + i,
            size: (i + 1) * ALIGNED_STEP,
            align: ALIGNED_STEP,
        });
    }
    if align <= 16 && size <= MID_MAX {
        let k = (size - SMALL_MAX).div_ceil(MID_STEP);
        return Some(class_at(MID_BASE + k - 1));
    }
    if align <= 16 && size <= LARGE_MAX {
        let k = (size - 8).div_ceil(LARGE_STEP);
        return Some(class_at(LARGE_BASE + k - LARGE_FIRST_K));
    }
    None
}

impl Class {
    fn cap(self) -> u16 {
        match self.index < LARGE_BASE {
            true => PER_CLASS,
            false => PER_LARGE_CLASS,
        }
    }

    fn layout(self) -> Layout {
        // SAFETY: sizes are non-zero multiples of the alignment's granule, alignments are
        // powers of two, and no size comes near isize::MAX.
        unsafe { Layout::from_size_align_unchecked(self.size, self.align) }
    }
}

/// A freed block, linked through its first word.
struct Free {
    next: *mut Free,
}

struct Lists {
    enabled: bool,
    bytes: usize,
    heads: [*mut Free; CLASSES],
    counts: [u16; CLASSES],
}

thread_local! {
    // No destructor (raw pointers and integers): reading it never allocates and works until
    // the thread's very end, which an allocator needs.
    static LISTS: UnsafeCell<Lists> = const {
        UnsafeCell::new(Lists {
            enabled: false,
            bytes: 0,
            heads: [ptr::null_mut(); CLASSES],
            counts: [0; CLASSES],
        })
    };
}

impl Lists {
    fn pop(&mut self, c: Class) -> *mut u8 {
        let head = self.heads[c.index];
        if head.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: every pointer on a list is a block of this class that `push` took, still
        // owned by the list, whose first word holds the next pointer.
        self.heads[c.index] = unsafe { (*head).next };
        self.counts[c.index] -= 1;
        self.bytes -= c.size;
        head.cast()
    }

    /// Keeps the block, or says no (the thread did not opt in, or its bounds are reached).
    fn push(&mut self, p: *mut u8, c: Class) -> bool {
        if !self.enabled || self.counts[c.index] >= c.cap() || self.bytes + c.size > BUDGET {
            return false;
        }
        let block: *mut Free = p.cast();
        // SAFETY: the block is at least 24 bytes and 16-aligned (its class's layout), and
        // the caller gave it up.
        unsafe {
            block.write(Free {
                next: self.heads[c.index],
            })
        };
        self.heads[c.index] = block;
        self.counts[c.index] += 1;
        self.bytes += c.size;
        true
    }
}

fn with_lists<R>(f: impl FnOnce(&mut Lists) -> R) -> R {
    // SAFETY: the lists are this thread's; nothing here re-enters the allocator while the
    // reference lives (pop and push only touch the lists and the blocks on them).
    LISTS.with(|l| f(unsafe { &mut *l.get() }))
}

/// Lets this thread keep freed blocks for reuse (see the module's documentation).
pub fn pool_this_thread() {
    with_lists(|l| l.enabled = true);
}

/// Gives this thread's kept blocks back to the system allocator and stops keeping them: for
/// a thread that opted in and is about to end.
pub fn flush_this_thread() {
    with_lists(|l| {
        l.enabled = false;
        for index in 0..CLASSES {
            let c = class_at(index);
            loop {
                let p = l.pop(c);
                if p.is_null() {
                    break;
                }
                // SAFETY: allocated by the system allocator with this class's layout.
                unsafe { System.dealloc(p, c.layout()) };
            }
        }
    });
}

fn class_at(index: usize) -> Class {
    let (size, align) = if index < SMALL_CLASSES {
        (SMALL_FIRST + index * SMALL_STEP, 16)
    } else if index < MID_BASE {
        ((index - SMALL_CLASSES + 1) * ALIGNED_STEP, ALIGNED_STEP)
    } else if index < LARGE_BASE {
        (SMALL_MAX + (index - MID_BASE + 1) * MID_STEP, 16)
    } else {
        (8 + (index - LARGE_BASE + LARGE_FIRST_K) * LARGE_STEP, 16)
    };
    Class { index, size, align }
}

/// The system allocator with a per-thread cache of freed small blocks in front (see the
/// module's documentation). Install it with `#[global_allocator]`.
pub struct Pooled;

// SAFETY: every block handed out is either the system allocator's answer for a layout at least
// as large and as aligned as the one asked for, or such a block freed earlier and kept; blocks
// go back to the system with the layout they were allocated with.
unsafe impl GlobalAlloc for Pooled {
    // Not inlined: with fat LTO every allocation site would take a copy (+1 MB of text).
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class(layout.size(), layout.align()) {
            Some(c) => {
                let p = with_lists(|l| l.pop(c));
                if p.is_null() {
                    // SAFETY: a valid, non-zero layout.
                    unsafe { System.alloc(c.layout()) }
                } else {
                    p
                }
            }
            // SAFETY: as the caller promised for `layout`.
            None => unsafe { System.alloc(layout) },
        }
    }

    // Not inlined: with fat LTO every allocation site would take a copy (+1 MB of text).
    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class(layout.size(), layout.align()) {
            Some(c) => {
                let p = with_lists(|l| l.pop(c));
                if p.is_null() {
                    // SAFETY: a valid, non-zero layout.
                    unsafe { System.alloc_zeroed(c.layout()) }
                } else {
                    // SAFETY: a kept block of at least `layout.size()` bytes.
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                    p
                }
            }
            // SAFETY: as the caller promised for `layout`.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    // Not inlined: with fat LTO every allocation site would take a copy (+1 MB of text).
    #[inline(never)]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match class(layout.size(), layout.align()) {
            Some(c) => {
                if !with_lists(|l| l.push(p, c)) {
                    // SAFETY: allocated with this class's layout (see `alloc`).
                    unsafe { System.dealloc(p, c.layout()) }
                }
            }
            // SAFETY: allocated by the system allocator with `layout`.
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    // Not inlined: with fat LTO every allocation site would take a copy (+1 MB of text).
    #[inline(never)]
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = class(layout.size(), layout.align());
        let new = class(new_size, layout.align());
        match (old, new) {
            // The block already has the room.
            (Some(a), Some(b)) if a == b => p,
            // SAFETY: neither size has a class: the system's block, the system's realloc.
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            _ => {
                // SAFETY: `new_size` with the old alignment is a valid layout (the caller's
                // promise for realloc).
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: a valid, non-zero layout.
                let q = unsafe { self.alloc(new_layout) };
                if !q.is_null() {
                    // SAFETY: both blocks hold at least the smaller of the two sizes, and they
                    // are distinct.
                    unsafe {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_glibc_chunk_sizes_and_cover_their_range() {
        let cases = [
            // (size, align) -> (block size, block align)
            ((1, 1), Some((24, 16))),
            ((24, 8), Some((24, 16))),
            ((25, 8), Some((40, 16))),
            ((40, 16), Some((40, 16))),
            ((1032, 8), Some((1032, 16))),
            ((1033, 8), Some((1160, 16))),
            ((1072, 8), Some((1160, 16))),
            ((1161, 16), Some((1288, 16))),
            ((4104, 8), Some((4104, 16))),
            ((4105, 8), Some((5128, 16))),
            ((8192, 1), Some((8200, 16))),
            ((16392, 8), Some((16392, 16))),
            ((16393, 8), None),
            ((1, 32), Some((128, 128))),
            ((128, 128), Some((128, 128))),
            ((129, 128), Some((256, 128))),
            ((4096, 64), Some((4096, 128))),
            ((4097, 64), None),
            ((64, 256), None),
        ];
        for ((size, align), want) in cases {
            let got = class(size, align).map(|c| (c.size, c.align));
            assert_eq!(got, want, "size {size} align {align}");
            if let Some(c) = class(size, align) {
                assert!(c.size >= size && c.align >= align);
                assert_eq!(class_at(c.index), c, "size {size} align {align}");
                assert_eq!(class(c.size, c.align), Some(c), "a block's own class");
            }
        }
        // Every class index is reachable and in range.
        for index in 0..CLASSES {
            let c = class_at(index);
            assert_eq!(class(c.size, c.align).map(|c| c.index), Some(index));
        }
    }

    /// Each test runs on its own thread: the lists are per thread.
    fn on_a_pooled_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            pool_this_thread();
            f();
            flush_this_thread();
            with_lists(|l| {
                assert_eq!(l.bytes, 0, "flushed");
                assert!(l.heads.iter().all(|h| h.is_null()));
            });
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn a_freed_block_serves_the_next_request_of_its_class_aligned_as_asked() {
        on_a_pooled_thread(|| unsafe {
            let a = Layout::from_size_align(100, 8).unwrap();
            let p = Pooled.alloc(a);
            assert!(!p.is_null());
            Pooled.dealloc(p, a);
            // Another size of the same class (97..=104) gets the same block back.
            let b = Layout::from_size_align(104, 8).unwrap();
            let q = Pooled.alloc(b);
            assert_eq!(p, q);
            Pooled.dealloc(q, b);

            // Over-aligned: tokio's task cells.
            let t = Layout::from_size_align(1200, 128).unwrap();
            let p = Pooled.alloc(t);
            assert_eq!(p as usize % 128, 0);
            Pooled.dealloc(p, t);
            let q = Pooled.alloc(Layout::from_size_align(1250, 64).unwrap());
            assert_eq!(p, q);
            assert_eq!(q as usize % 128, 0);
            Pooled.dealloc(q, Layout::from_size_align(1250, 64).unwrap());
        });
    }

    #[test]
    fn zeroed_blocks_are_zero_even_when_reused() {
        on_a_pooled_thread(|| unsafe {
            let l = Layout::from_size_align(200, 8).unwrap();
            let p = Pooled.alloc(l);
            ptr::write_bytes(p, 0xAB, 200);
            Pooled.dealloc(p, l);
            let q = Pooled.alloc_zeroed(l);
            assert_eq!(p, q, "reused");
            assert!(std::slice::from_raw_parts(q, 200).iter().all(|b| *b == 0));
            Pooled.dealloc(q, l);
        });
    }

    #[test]
    fn realloc_keeps_the_contents_within_a_class_and_across_classes() {
        on_a_pooled_thread(|| unsafe {
            let l = Layout::from_size_align(30, 1).unwrap();
            let p = Pooled.alloc(l);
            for i in 0..30 {
                *p.add(i) = i as u8;
            }
            // 30 -> 40: the same class, the same block.
            let q = Pooled.realloc(p, l, 40);
            assert_eq!(p, q);
            // 40 -> 3000 -> 5000 -> 20000 (classes of 128 bytes, of 1 KiB, then none: the
            // system's) and back down.
            let l40 = Layout::from_size_align(40, 1).unwrap();
            let r = Pooled.realloc(q, l40, 3000);
            let l3000 = Layout::from_size_align(3000, 1).unwrap();
            let s = Pooled.realloc(r, l3000, 5000);
            let l5000 = Layout::from_size_align(5000, 1).unwrap();
            let s = Pooled.realloc(s, l5000, 20000);
            let l20000 = Layout::from_size_align(20000, 1).unwrap();
            let s = Pooled.realloc(s, l20000, 24000);
            let l24000 = Layout::from_size_align(24000, 1).unwrap();
            let t = Pooled.realloc(s, l24000, 20);
            for i in 0..20 {
                assert_eq!(*t.add(i), i as u8, "byte {i}");
            }
            Pooled.dealloc(t, Layout::from_size_align(20, 1).unwrap());
        });
    }

    #[test]
    fn a_thread_keeps_at_most_its_bounds() {
        on_a_pooled_thread(|| unsafe {
            // More frees of one class than it keeps.
            let l = Layout::from_size_align(64, 8).unwrap();
            let blocks: Vec<_> = (0..PER_CLASS as usize + 50)
                .map(|_| Pooled.alloc(l))
                .collect();
            for p in &blocks {
                Pooled.dealloc(*p, l);
            }
            let c = class(64, 8).unwrap();
            with_lists(|lists| assert_eq!(lists.counts[c.index], PER_CLASS));
            // Fewer of the buffers past 4 KiB.
            let l = Layout::from_size_align(8192, 1).unwrap();
            let blocks: Vec<_> = (0..PER_LARGE_CLASS as usize + 5)
                .map(|_| Pooled.alloc(l))
                .collect();
            for p in &blocks {
                Pooled.dealloc(*p, l);
            }
            let c = class(8192, 1).unwrap();
            with_lists(|lists| assert_eq!(lists.counts[c.index], PER_LARGE_CLASS));
            // The byte budget across classes: more than it holds, in two classes.
            for size in [4000, 3000] {
                let big = Layout::from_size_align(size, 128).unwrap();
                let blocks: Vec<_> = (0..200).map(|_| Pooled.alloc(big)).collect();
                for p in &blocks {
                    Pooled.dealloc(*p, big);
                }
            }
            with_lists(|lists| {
                assert!(lists.bytes <= BUDGET, "{}", lists.bytes);
                assert!(lists.bytes > BUDGET - 4096, "filled: {}", lists.bytes);
            });
        });
    }

    #[test]
    fn a_thread_that_did_not_opt_in_keeps_nothing() {
        std::thread::spawn(|| unsafe {
            let l = Layout::from_size_align(64, 8).unwrap();
            let p = Pooled.alloc(l);
            Pooled.dealloc(p, l);
            with_lists(|lists| assert_eq!(lists.bytes, 0));
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn blocks_freed_on_other_threads_are_kept_there_and_stay_intact() {
        // Allocations on one thread, frees on another, reuse there; every block's contents
        // checked before it is given up.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, usize)>(64);
        let producer = std::thread::spawn(move || {
            pool_this_thread();
            for round in 0..2_000usize {
                let size = 8 + (round * 37) % 2000;
                let l = Layout::from_size_align(size, 8).unwrap();
                let p = unsafe { Pooled.alloc(l) };
                unsafe { ptr::write_bytes(p, (round % 251) as u8, size) };
                if tx.send((p as usize, round)).is_err() {
                    break;
                }
            }
            flush_this_thread();
        });
        on_a_pooled_thread(move || {
            for (p, round) in rx {
                let size = 8 + (round * 37) % 2000;
                let p = p as *mut u8;
                let bytes = unsafe { std::slice::from_raw_parts(p, size) };
                assert!(
                    bytes.iter().all(|b| *b == (round % 251) as u8),
                    "round {round}"
                );
                let l = Layout::from_size_align(size, 8).unwrap();
                unsafe { Pooled.dealloc(p, l) };
                // And reuse here.
                let q = unsafe { Pooled.alloc(l) };
                unsafe { Pooled.dealloc(q, l) };
            }
        });
        producer.join().expect("producer");
    }
}
