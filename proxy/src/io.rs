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
use tokio::net::TcpStream;

pub struct ProxyIo<T = TcpStream> {
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

impl<T> ProxyIo<T> {
    pub fn get_ref(&self) -> &T {
        &self.inner
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
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// AsyncRead/AsyncWrite for a two-variant I/O enum by delegation.
macro_rules! delegate_io {
    ($ty:ident, $a:ident, $b:ident) => {
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
                    $ty::$a(io) => Pin::new(io).poll_write_vectored(cx, bufs),
                    $ty::$b(io) => Pin::new(io).poll_write_vectored(cx, bufs),
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

delegate_io!(ServerIo, Plain, Tls);
delegate_io!(UpstreamIo, Plain, Tls);
