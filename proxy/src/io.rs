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

pub struct ProxyIo {
    prefix: Bytes,
    inner: TcpStream,
    read: u64,
    written: u64,
    counters: Option<(Counter, Counter)>,
}

impl ProxyIo {
    /// `prefix` is what detection already read; it is returned before anything else.
    pub fn new(inner: TcpStream, prefix: Bytes, counters: Option<(Counter, Counter)>) -> Self {
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

impl Drop for ProxyIo {
    fn drop(&mut self) {
        if let Some((read, written)) = &self.counters {
            read.inc_by(self.read);
            written.inc_by(self.written);
        }
    }
}

impl AsyncRead for ProxyIo {
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

impl AsyncWrite for ProxyIo {
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
