//! `remora_proxy::detect::classify` on arbitrary bytes, and `remora_proxy::detect::detect`
//! over an in-memory reader that hands the same bytes out in fuzzed chunks.
//!
//! Input: byte 0 picks how the stream ends (bits 0-1: EOF, stall, I/O error) and seeds the
//! chunk sizes (bits 2-7); the rest is the stream.
//!
//! Invariants:
//! - `classify` decides once: when a prefix is classified `Some(c)`, every longer prefix (and
//!   the whole buffer) is classified `Some(c)` too.
//! - `detect` does not depend on how the bytes arrive: one read of everything, or reads of
//!   fuzzed sizes, give the same answer (the bytes handed back may be shorter when it decided
//!   early, but are always a prefix of the stream).
//! - A `Tls { sni }` answer is what `tls::client_hello` says of the bytes handed back; `Closed`
//!   and `Idle` hand back no bytes; never more than `MAX_HELLO_BYTES` are buffered.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use remora_proxy::fuzzing::detect::{Detected, MAX_HELLO_BYTES, classify, detect};
use remora_proxy::fuzzing::tls::{Hello, client_hello};
use tokio::io::{AsyncRead, ReadBuf};

#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    Eof,
    Stall,
    Error,
}

/// Hands `data` out in chunks of the given sizes (cycled), then ends as `end` says.
struct Reader<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    i: usize,
    end: End,
}

impl AsyncRead for Reader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.data.is_empty() {
            return match self.end {
                End::Eof => Poll::Ready(Ok(())),
                // Never woken: with the runtime's clock paused, the detection timeout fires
                // at once.
                End::Stall => Poll::Pending,
                End::Error => Poll::Ready(Err(io::Error::other("fuzzed read error"))),
            };
        }
        let size = self.sizes[self.i % self.sizes.len()];
        self.i += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    })
}

fn run(data: &[u8], sizes: Vec<usize>, end: End) -> io::Result<(Detected, Vec<u8>)> {
    let mut r = Reader {
        data,
        sizes,
        i: 0,
        end,
    };
    runtime().block_on(async {
        let (d, b) = detect(&mut r, Duration::from_millis(5)).await?;
        Ok((d, b.to_vec()))
    })
}

fn check_classify(data: &[u8]) {
    let full = classify(data);
    let step = if data.len() <= 512 {
        1
    } else {
        data.len() / 64
    };
    let mut i = 0;
    while i < data.len() {
        if let Some(c) = classify(&data[..i]) {
            assert_eq!(
                full,
                Some(c),
                "prefix of {i} bytes was decided, the whole buffer differs"
            );
        }
        i += step;
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&ctl, data)) = input.split_first() else {
        return;
    };
    check_classify(data);

    let end = match ctl & 3 {
        0 | 3 => End::Eof,
        1 => End::Stall,
        _ => End::Error,
    };
    // Chunk sizes from the seed bits: 1, 2, 3… up to 64, or a few co-prime sizes.
    let seed = (ctl >> 2) as usize;
    let sizes = if seed < 32 {
        vec![seed + 1]
    } else {
        vec![1 + seed % 7, 13, 1 + seed, 300, 2]
    };

    let whole = run(data, vec![usize::MAX], end);
    let chunked = run(data, sizes, end);
    match (&whole, &chunked) {
        (Ok((a, _)), Ok((b, _))) => {
            assert_eq!(a, b, "the answer depends on the read sizes")
        }
        (Err(_), Err(_)) => {}
        // An I/O error can come before a decision in one run and after it in the other only
        // when the stream ends in an error; otherwise both must agree.
        _ => assert_eq!(end, End::Error, "{whole:?} vs {chunked:?}"),
    }
    for r in [&whole, &chunked] {
        let Ok((d, bytes)) = r else { continue };
        assert!(
            data.starts_with(bytes),
            "handed back bytes that were not read"
        );
        assert!(bytes.len() <= MAX_HELLO_BYTES);
        match d {
            Detected::Closed | Detected::Idle => assert!(bytes.is_empty(), "{d:?}"),
            Detected::Tls { sni } => {
                assert_eq!(bytes.first(), Some(&0x16));
                assert_eq!(client_hello(bytes), Hello::Complete { sni: sni.clone() });
            }
            Detected::BadHello => assert_eq!(bytes.first(), Some(&0x16)),
            _ => {}
        }
    }
});
