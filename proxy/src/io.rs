//! The accepted connection's I/O type: replays the bytes detection read, and counts bytes.
//!
//! One concrete type for every accepted connection keeps the HTTP servers and the opaque forwarder
//! free of generics. Byte counts are kept in plain integers and added to the metrics once, when
//! the connection ends, so the hot path touches no shared state.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// An accepted or dialled byte stream: TCP, or a Unix domain socket on the local hop between
/// the app and the proxy (no TCP stack, file permissions for access control).
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(t) => Some(t),
            Stream::Unix(_) => None,
        }
    }
}

pub struct ProxyIo<T = Stream> {
    prefix: Bytes,
    inner: T,
    read: u64,
    written: u64,
    counters: Option<(Counter, Counter)>,
}

impl<T> ProxyIo<T> {
    /// `prefix` is what detection already read; it is returned before anything else.
    pub fn new(inner: T, prefix: Bytes, counters: Option<(Counter, Counter)>) -> Self {
        let read = prefix.len() as u64;
        ProxyIo {
            prefix,
            inner,
            read,
            written: 0,
            counters,
        }
    }
}

impl<T> Drop for ProxyIo<T> {
    fn drop(&mut self) {
        if let Some((read, written)) = &self.counters {
            read.inc_by(self.read);
            written.inc_by(self.written);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProxyIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // An empty slice still holds detection's whole buffer (4 KiB, 16 KiB for a
                // ClientHello) for the connection's life; let it go.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProxyIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.written += n as u64;
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.written += n as u64;
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An accepted connection as the HTTP servers and the opaque forwarder see it: plaintext, or
/// inside the mTLS session the proxy terminated (whose own bytes are counted underneath).
pub enum ServerIo {
    Plain(ProxyIo),
    Tls(ProxyIo<Box<tokio_rustls::server::TlsStream<ProxyIo>>>),
}

/// A connection the proxy opened to an upstream: plaintext, or mTLS to a peer proxy.
pub enum UpstreamIo {
    Plain(Stream),
    Tls(Box<tokio_rustls::client::TlsStream<Stream>>),
}

/// Vectored writes of at most this many bytes reach a socket as one `send` of a copy. On Linux
/// a `writev` costs 80–100 ns more than a `send` of the same bytes (loopback TCP, 150 + 128
/// bytes in two slices: 705–738 against 605–653 ns a call, both on one CPU), and copying 1 KiB
/// costs less than that. Such writes are the common case: hyper queues an HTTP/1 response's
/// head and its small body as two slices; h2 copies DATA of up to 256 bytes into its frame
/// buffer (one slice) and chains larger payloads (two); rustls hands over its queued records.
const FLATTEN_UP_TO: usize = 1024;

/// A socket's vectored write: one non-empty slice goes to `poll_write` (`send`), several with
/// at most [`FLATTEN_UP_TO`] bytes in all are copied together first; larger ones go to
/// `writev` as they are. The result counts bytes from the start of `bufs`, as a vectored
/// write's does.
fn poll_write_flat<W: AsyncWrite + ?Sized>(
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<std::io::Result<usize>> {
    let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
    match (nonempty.next(), nonempty.next()) {
        (Some(one), None) => io.poll_write(cx, one),
        (Some(_), Some(_)) => {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            if total > FLATTEN_UP_TO {
                return io.poll_write_vectored(cx, bufs);
            }
            // Not zeroed first: that alone cost a third of what the copy saves. (Raw copies:
            // the safe `MaybeUninit` slice methods need Rust 1.93, above our rust-version.)
            let mut flat = std::mem::MaybeUninit::<[u8; FLATTEN_UP_TO]>::uninit();
            let base = flat.as_mut_ptr().cast::<u8>();
            let mut at = 0;
            for b in bufs {
                // SAFETY: `at + b.len() <= total <= FLATTEN_UP_TO`, so the copy stays inside
                // `flat`, a local that no slice of `bufs` can overlap.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), base.add(at), b.len()) };
                at += b.len();
            }
            // SAFETY: the loop above wrote the first `at` bytes of `flat`, every one of them.
            let flat = unsafe { std::slice::from_raw_parts(base.cast_const(), at) };
            io.poll_write(cx, flat)
        }
        (None, _) => io.poll_write_vectored(cx, bufs),
    }
}

/// A vectored write passed on as it is.
fn poll_write_as_is<W: AsyncWrite + ?Sized>(
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<std::io::Result<usize>> {
    io.poll_write_vectored(cx, bufs)
}

/// AsyncRead/AsyncWrite for a two-variant I/O enum by delegation; `$vectored` is how a
/// vectored write reaches the variants.
macro_rules! delegate_io {
    ($ty:ident, $a:ident, $b:ident, $vectored:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(io) => Pin::new(io).poll_read(cx, buf),
                    $ty::$b(io) => Pin::new(io).poll_read(cx, buf),
                }
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(io) => Pin::new(io).poll_write(cx, buf),
                    $ty::$b(io) => Pin::new(io).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(io) => $vectored(Pin::new(io), cx, bufs),
                    $ty::$b(io) => $vectored(Pin::new(io), cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::$a(io) => io.is_write_vectored(),
                    $ty::$b(io) => io.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(io) => Pin::new(io).poll_flush(cx),
                    $ty::$b(io) => Pin::new(io).poll_flush(cx),
                }
            }

            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(io) => Pin::new(io).poll_shutdown(cx),
                    $ty::$b(io) => Pin::new(io).poll_shutdown(cx),
                }
            }
        }
    };
}

// Sockets are where the copy pays; the enums above them pass writes down as they are.
delegate_io!(Stream, Tcp, Unix, poll_write_flat);
delegate_io!(ServerIo, Plain, Tls, poll_write_as_is);
delegate_io!(UpstreamIo, Plain, Tls, poll_write_as_is);

/// Opaque tunnels (inbound opaque, `CONNECT`, upgraded streams) that move no byte either way
/// for this long are closed, so silent connections cannot pile up into permanent tunnels.
/// An hour is above every common keep-alive interval of database and message-queue clients.
pub const TUNNEL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// One side of a tunnel, noting when bytes last moved.
struct Active<'a, T> {
    inner: &'a mut T,
    last: &'a std::sync::atomic::AtomicU64,
    start: tokio::time::Instant,
}

impl<T> Active<'_, T> {
    fn touch(&self) {
        self.last.store(
            self.start.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res
            && n > 0
        {
            this.touch();
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides have closed (half-closes are forwarded), or until no byte
/// has moved for `idle` (then an `TimedOut` error).
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, idle: std::time::Duration) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    let start = tokio::time::Instant::now();
    let last = AtomicU64::new(0);
    let mut a = Active {
        inner: a,
        last: &last,
        start,
    };
    let mut b = Active {
        inner: b,
        last: &last,
        start,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let seen = last.load(Ordering::Relaxed);
        let deadline = start + std::time::Duration::from_millis(seen) + idle;
        tokio::select! {
            res = &mut copy => return res.map(|_| ()),
            _ = tokio::time::sleep_until(deadline) => {
                if last.load(Ordering::Relaxed) == seen {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no byte moved for {idle:?}; tunnel closed"),
                    ));
                }
            }
        }
    }
}

/// Waits for the first side to speak: bytes from `client` (returned, at most `max`), or the
/// app (`Ok(None)`; its bytes stay in its socket). `Err` when the client closes or fails first.
pub async fn first_speaker<C: AsyncRead + Unpin>(
    client: &mut C,
    app: &UpstreamIo,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; max];
    let app_speaks = async {
        match app {
            UpstreamIo::Plain(Stream::Tcp(tcp)) => {
                let mut one = [0u8; 1];
                // A peek that returns (data or EOF) means the app has acted; errors likewise.
                let _ = tcp.peek(&mut one).await;
            }
            // Readable means data or EOF is waiting, like a peek that returns.
            UpstreamIo::Plain(Stream::Unix(unix)) => {
                let _ = unix.readable().await;
            }
            UpstreamIo::Tls(_) => std::future::pending().await,
        }
    };
    // Bounded like a tunnel: a connection on which nobody ever speaks is closed after
    // TUNNEL_IDLE_TIMEOUT instead of holding a slot and an app connection for ever.
    let idle = tokio::time::sleep(TUNNEL_IDLE_TIMEOUT);
    tokio::select! {
        biased;
        _ = idle => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "neither side spoke; closed",
        )),
        n = client.read(&mut buf) => match n? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf.truncate(n);
                Ok(Some(buf))
            }
        },
        _ = app_speaks => Ok(None),
    }
}

pin_project_lite::pin_project! {
    /// Upstream HTTP/2 writes, gathered: the first write of a burst waits one scheduler turn,
    /// so frames queued by tasks that are already runnable leave in the same system call.
    ///
    /// Why: hyper's HTTP/2 client sends a request's HEADERS from the connection task, and its
    /// body from a task that only gets send capacity once the stream is open, i.e. after the
    /// connection task has flushed the HEADERS. A gRPC unary call thus took two `writev`s
    /// (HEADERS, then DATA), each waking the upstream app: at a sidecar's load the wake-ups
    /// and system calls, not parsing, are the cost. One turn of the scheduler costs a task
    /// poll; the second system call and wake-up cost far more. A burst that leaves no stream
    /// open (a GET's HEADERS with END_STREAM) goes at once: nothing follows it to gather, and
    /// the turn was one more poll of the connection per request.
    pub struct Gather<T> {
        #[pin]
        io: T,
        waited: bool,
    }
}

impl<T> Gather<T> {
    pub fn new(io: T) -> Self {
        Gather { io, waited: false }
    }
}

impl<T: AsyncRead> AsyncRead for Gather<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> Gather<T> {
    /// `true` once this burst has waited its turn, or has no need to (then the write goes
    /// through).
    fn turn(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> bool {
        let me = self.project();
        if *me.waited || !leaves_a_stream_open(bufs) {
            return true;
        }
        *me.waited = true;
        cx.waker().wake_by_ref();
        false
    }
}

/// Whether the first write of a burst should wait its turn: when it leaves a stream open (a
/// HEADERS or DATA frame without END_STREAM and no later one with it), whose next frames are
/// likely queued by a task that is already runnable (a gRPC call's body after its HEADERS), or
/// when it is not whole frames (the connection preface, a write cut short before). A request
/// that ends in this write (a GET's HEADERS with END_STREAM) has nothing to wait for: the turn
/// would cost a poll of the connection and gather nothing.
fn leaves_a_stream_open(bufs: &[IoSlice<'_>]) -> bool {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let byte = |mut at: usize| -> u8 {
        for b in bufs {
            if at < b.len() {
                return b[at];
            }
            at -= b.len();
        }
        0
    };
    // Streams left open so far; more than fit counts as open.
    let mut open = [0u32; 4];
    let mut n = 0;
    let mut at = 0;
    while at < total {
        if total - at < 9 {
            return true;
        }
        let len = usize::from(byte(at)) << 16
            | usize::from(byte(at + 1)) << 8
            | usize::from(byte(at + 2));
        let (kind, flags) = (byte(at + 3), byte(at + 4));
        let id = u32::from_be_bytes([byte(at + 5), byte(at + 6), byte(at + 7), byte(at + 8)])
            & 0x7fff_ffff;
        // DATA (0) and HEADERS (1) carry END_STREAM in bit 0.
        if kind <= 1 {
            let ends = flags & 1 != 0;
            match open[..n].iter().position(|&s| s == id) {
                Some(i) if ends => {
                    open[i] = open[n - 1];
                    n -= 1;
                }
                Some(_) => {}
                None if ends => {}
                None if n == open.len() => return true,
                None => {
                    open[n] = id;
                    n += 1;
                }
            }
        }
        at += 9 + len;
    }
    n > 0 || at != total
}

impl<T: AsyncWrite> AsyncWrite for Gather<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if !self.as_mut().turn(cx, &[IoSlice::new(buf)]) {
            return Poll::Pending;
        }
        let me = self.project();
        let res = me.io.poll_write(cx, buf);
        if res.is_ready() {
            *me.waited = false;
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if !self.as_mut().turn(cx, bufs) {
            return Poll::Pending;
        }
        let me = self.project();
        let res = me.io.poll_write_vectored(cx, bufs);
        if res.is_ready() {
            *me.waited = false;
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod flat_write_tests {
    use super::*;

    /// Records how each write arrived, and takes at most `accept` bytes of it.
    #[derive(Default)]
    struct Recording {
        calls: Vec<(&'static str, Vec<u8>)>,
        accept: Option<usize>,
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = self.accept.map_or(buf.len(), |a| a.min(buf.len()));
            self.calls.push(("send", buf[..n].to_vec()));
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            all.truncate(self.accept.unwrap_or(usize::MAX));
            let n = all.len();
            self.calls.push(("writev", all));
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(io: &mut Recording, bufs: &[&[u8]]) -> usize {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll_write_flat(Pin::new(io), &mut cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("the recording writer is always ready: {other:?}"),
        }
    }

    #[test]
    fn small_writes_become_one_send_large_ones_stay_vectored() {
        let big = vec![7u8; FLATTEN_UP_TO];
        // (case, the slices, how they reach the socket, the bytes written)
        type Case<'a> = (&'a str, &'a [&'a [u8]], &'a str, Vec<u8>);
        let cases: &[Case<'_>] = &[
            ("one slice", &[b"head"], "send", b"head".to_vec()),
            (
                "one among empties",
                &[b"", b"body", b""],
                "send",
                b"body".to_vec(),
            ),
            (
                "head and body",
                &[b"head", b"", b"body"],
                "send",
                b"headbody".to_vec(),
            ),
            (
                "exactly the limit",
                &[&big[..1000], &big[1000..]],
                "send",
                big.clone(),
            ),
            (
                "over the limit",
                &[&big, b"x"],
                "writev",
                [&big[..], b"x"].concat(),
            ),
            ("nothing", &[b"", b""], "writev", Vec::new()),
        ];
        for (name, bufs, how, bytes) in cases {
            let mut io = Recording::default();
            let n = write(&mut io, bufs);
            assert_eq!(n, bytes.len(), "{name}: bytes reported");
            assert_eq!(io.calls, vec![(*how, bytes.clone())], "{name}");
        }
    }

    #[test]
    fn a_short_write_reports_the_bytes_from_the_start() {
        let mut io = Recording {
            accept: Some(6),
            ..Recording::default()
        };
        assert_eq!(write(&mut io, &[b"head", b"body"]), 6);
        assert_eq!(io.calls, vec![("send", b"headbo".to_vec())]);
        // The same for one that stays vectored.
        let big = vec![7u8; FLATTEN_UP_TO];
        let mut io = Recording {
            accept: Some(FLATTEN_UP_TO + 1),
            ..Recording::default()
        };
        assert_eq!(write(&mut io, &[&big, b"xy"]), FLATTEN_UP_TO + 1);
        assert_eq!(io.calls, vec![("writev", [&big[..], b"x"].concat())]);
    }
}

#[cfg(test)]
mod gather_and_prefix_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;

    /// Counts the writes that reach the socket.
    struct Counting(Arc<AtomicUsize>, Vec<u8>);

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            self.1.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    use std::sync::Arc;

    #[test]
    fn a_burst_waits_one_turn_then_writes_through() {
        let writes = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::new(Counting(writes.clone(), Vec::new()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // The first write of a burst yields (and asks to be polled again) without writing.
        assert!(Pin::new(&mut g).poll_write(&mut cx, b"head").is_pending());
        assert_eq!(writes.load(Ordering::Relaxed), 0);
        // Polled again, it goes through; the burst's next write waits its turn again.
        assert!(matches!(
            Pin::new(&mut g).poll_write(&mut cx, b"head+data"),
            Poll::Ready(Ok(9))
        ));
        assert_eq!(writes.load(Ordering::Relaxed), 1);
        assert!(Pin::new(&mut g).poll_write(&mut cx, b"x").is_pending());
    }

    /// An HTTP/2 frame: type, flags, stream, payload length.
    fn frame(kind: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.resize(9 + len, 0);
        f
    }

    #[test]
    fn which_bursts_wait_their_turn() {
        const DATA: u8 = 0;
        const HEADERS: u8 = 1;
        const ES: u8 = 0x1;
        const EH: u8 = 0x4;
        let cat = |frames: &[Vec<u8>]| frames.concat();
        let waits = |bytes: &[u8]| leaves_a_stream_open(&[IoSlice::new(bytes)]);
        // A GET: HEADERS with END_STREAM ends its stream here, nothing to wait for.
        assert!(!waits(&frame(HEADERS, ES | EH, 1, 30)));
        // A gRPC call's HEADERS: its DATA is coming from the body task.
        assert!(waits(&frame(HEADERS, EH, 1, 30)));
        // ... unless it is already here, ending the stream.
        assert!(!waits(&cat(&[
            frame(HEADERS, EH, 1, 30),
            frame(DATA, ES, 1, 10)
        ])));
        // A body still streaming.
        assert!(waits(&frame(DATA, 0, 3, 100)));
        // Several requests: one left open is enough.
        assert!(waits(&cat(&[
            frame(HEADERS, ES | EH, 1, 20),
            frame(HEADERS, EH, 3, 20),
            frame(HEADERS, ES | EH, 5, 20),
        ])));
        assert!(!waits(&cat(&[
            frame(HEADERS, EH, 1, 20),
            frame(HEADERS, EH, 3, 20),
            frame(DATA, ES, 3, 5),
            frame(DATA, ES, 1, 5),
        ])));
        // More open streams than it tracks: counted as open.
        let many: Vec<Vec<u8>> = (0..6).map(|i| frame(HEADERS, EH, 1 + 2 * i, 8)).collect();
        assert!(waits(&cat(&many)));
        // Control frames alone: SETTINGS ack, WINDOW_UPDATE, PING.
        assert!(!waits(&cat(&[
            frame(4, 1, 0, 0),
            frame(8, 0, 0, 4),
            frame(6, 0, 0, 8)
        ])));
        // Not whole frames: the preface, a frame cut short, a stray byte.
        assert!(waits(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(waits(&frame(HEADERS, ES | EH, 1, 30)[..20]));
        assert!(waits(&[0u8; 5]));
        // A DATA frame's payload in a second slice (h2's vectored write) is read across.
        let head = frame(DATA, ES, 1, 0);
        let mut head = head[..9].to_vec();
        head[2] = 64;
        let payload = [7u8; 64];
        assert!(!leaves_a_stream_open(&[
            IoSlice::new(&head),
            IoSlice::new(&payload)
        ]));
        assert!(leaves_a_stream_open(&[
            IoSlice::new(&head),
            IoSlice::new(&payload[..63])
        ]));
    }

    #[test]
    fn a_request_that_ends_in_the_write_goes_through_at_once() {
        let writes = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::new(Counting(writes.clone(), Vec::new()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let get = frame(1, 0x5, 1, 12);
        assert!(matches!(
            Pin::new(&mut g).poll_write(&mut cx, &get),
            Poll::Ready(Ok(21))
        ));
        assert_eq!(writes.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn gathered_writes_arrive_whole() {
        let writes = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::new(Counting(writes.clone(), Vec::new()));
        g.write_all(b"HEADERS").await.unwrap();
        g.write_all(b"DATA").await.unwrap();
        assert_eq!(g.io.1, b"HEADERSDATA");
        assert_eq!(writes.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn the_detection_buffer_is_let_go_once_replayed() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(64);
        let big = Bytes::from(vec![b'x'; 4096]).slice(..3);
        let mut io = ProxyIo::new(a, big, None);
        let mut out = [0u8; 3];
        io.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"xxx");
        // Nothing of the 4 KiB allocation is referenced any more.
        assert!(io.prefix.is_empty());
        assert_eq!(io.prefix.as_ptr(), Bytes::new().as_ptr());
        b.write_all(b"y").await.unwrap();
        let mut one = [0u8; 1];
        io.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"y");
    }
}
