//! The `h3::quic` traits over quinn: what h3 needs from a QUIC connection and its streams.
//!
//! h3-quinn offers the same, but hides the quinn streams, and the inbound side needs one thing
//! from them that h3 does not surface: a peer's STOP_SENDING on a response that is still
//! waiting for the app. A client that cancels a call after sending its whole request can only
//! say so that way (the request side is finished, so there is nothing left to reset), and the
//! app must hear of it at once, as it does over HTTP/2 (RST_STREAM). So each accepted stream's
//! `stopped()` future is kept in [`Stopped`] for the server to pick up by stream id. Nothing
//! here panics on what a peer sends: an error code that does not fit a QUIC varint becomes the
//! largest one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;
use tokio_util::sync::ReusableBoxFuture;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + std::marker::Send + Sync>>;

/// A future that completes when the peer sends STOP_SENDING (with its code) or the stream
/// ends otherwise.
pub(crate) type StoppedFuture = BoxFuture<Option<u64>>;

/// The `stopped()` futures of accepted request streams, by stream id, until the server takes
/// its own. Bounded: entries of streams that never became a request (the peer reset them
/// before their headers) are dropped when the map outgrows the stream limit twice over;
/// a live stream that loses its entry only loses early cancellation, nothing else.
#[derive(Clone, Default)]
pub(crate) struct Stopped(Arc<Mutex<HashMap<u64, StoppedFuture>>>);

impl Stopped {
    fn insert(&self, id: u64, f: StoppedFuture) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= 2 * super::MAX_STREAMS as usize {
            map.clear();
        }
        map.insert(id, f);
    }

    /// The stopped future of the request stream `id`, once.
    pub(crate) fn take(&self, id: StreamId) -> Option<StoppedFuture> {
        let id: u64 = id.into_inner();
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&id)
    }
}

fn varint(code: u64) -> VarInt {
    VarInt::from_u64(code).unwrap_or(VarInt::MAX)
}

fn stream_id(id: quinn::StreamId) -> StreamId {
    // A quinn stream id is a QUIC varint (< 2^62), which is all h3's id checks.
    StreamId::try_from(u64::from(id))
        .unwrap_or_else(|_| StreamId::from(h3::proto::varint::VarInt::from_u32(0)))
}

fn connection_error(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => ConnectionErrorIncoming::ApplicationClose {
            error_code: c.error_code.into_inner(),
        },
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn stream_connection_error(e: quinn::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: connection_error(e),
    }
}

fn read_error(e: quinn::ReadError) -> StreamErrorIncoming {
    match e {
        quinn::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(e) => stream_connection_error(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn write_error(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(e) => stream_connection_error(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

/// One QUIC connection, as h3 drives it.
pub(crate) struct Conn {
    conn: quinn::Connection,
    accept_bi:
        Option<BoxFuture<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>>,
    accept_uni: Option<BoxFuture<Result<quinn::RecvStream, quinn::ConnectionError>>>,
    opener: Opener,
    /// Server side: where accepted streams leave their `stopped()` future.
    stopped: Option<Stopped>,
}

impl Conn {
    pub(crate) fn new(conn: quinn::Connection, stopped: Option<Stopped>) -> Self {
        Conn {
            opener: Opener::new(conn.clone()),
            conn,
            accept_bi: None,
            accept_uni: None,
            stopped,
        }
    }
}

impl quic::Connection<Bytes> for Conn {
    type RecvStream = Recv;
    type OpenStreams = Opener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Recv, ConnectionErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.accept_uni.get_or_insert_with(|| {
            let conn = conn.clone();
            Box::pin(async move { conn.accept_uni().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.accept_uni = None;
        Poll::Ready(res.map(Recv::new).map_err(connection_error))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Bidi, ConnectionErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.accept_bi.get_or_insert_with(|| {
            let conn = conn.clone();
            Box::pin(async move { conn.accept_bi().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.accept_bi = None;
        let (send, recv) = res.map_err(connection_error)?;
        if let Some(stopped) = &self.stopped {
            let f = send.stopped();
            stopped.insert(
                u64::from(send.id()),
                Box::pin(async move { f.await.ok().flatten().map(VarInt::into_inner) }),
            );
        }
        Poll::Ready(Ok(Bidi {
            send: Send::new(send),
            recv: Recv::new(recv),
        }))
    }

    fn opener(&self) -> Opener {
        Opener::new(self.conn.clone())
    }
}

impl quic::OpenStreams<Bytes> for Conn {
    type BidiStream = Bidi;
    type SendStream = Send;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bidi, StreamErrorIncoming>> {
        self.opener.poll_open_bidi(cx)
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Send, StreamErrorIncoming>> {
        self.opener.poll_open_send(cx)
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        self.conn.close(varint(code.value()), reason);
    }
}

/// Opens streams on a connection (h3's clients hold one each).
pub(crate) struct Opener {
    conn: quinn::Connection,
    open_bi:
        Option<BoxFuture<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>>,
    open_uni: Option<BoxFuture<Result<quinn::SendStream, quinn::ConnectionError>>>,
}

impl Opener {
    fn new(conn: quinn::Connection) -> Self {
        Opener {
            conn,
            open_bi: None,
            open_uni: None,
        }
    }
}

impl Clone for Opener {
    fn clone(&self) -> Self {
        Opener::new(self.conn.clone())
    }
}

impl quic::OpenStreams<Bytes> for Opener {
    type BidiStream = Bidi;
    type SendStream = Send;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bidi, StreamErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.open_bi.get_or_insert_with(|| {
            let conn = conn.clone();
            Box::pin(async move { conn.open_bi().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.open_bi = None;
        let (send, recv) = res.map_err(stream_connection_error)?;
        Poll::Ready(Ok(Bidi {
            send: Send::new(send),
            recv: Recv::new(recv),
        }))
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Send, StreamErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.open_uni.get_or_insert_with(|| {
            let conn = conn.clone();
            Box::pin(async move { conn.open_uni().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.open_uni = None;
        Poll::Ready(res.map(Send::new).map_err(stream_connection_error))
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        self.conn.close(varint(code.value()), reason);
    }
}

/// A bidirectional stream: a request and its response.
pub(crate) struct Bidi {
    send: Send,
    recv: Recv,
}

impl quic::BidiStream<Bytes> for Bidi {
    type SendStream = Send;
    type RecvStream = Recv;

    fn split(self) -> (Send, Recv) {
        (self.send, self.recv)
    }
}

impl quic::RecvStream for Bidi {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl quic::SendStream<Bytes> for Bidi {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

type ReadResult = (
    quinn::RecvStream,
    Result<Option<quinn::Chunk>, quinn::ReadError>,
);

/// The receiving side of a stream. Reads whole chunks (no copy); the stream lives in the read
/// future while a read is pending.
pub(crate) struct Recv {
    stream: Option<quinn::RecvStream>,
    id: StreamId,
    read: ReusableBoxFuture<'static, ReadResult>,
}

impl Recv {
    fn new(stream: quinn::RecvStream) -> Self {
        Recv {
            id: stream_id(stream.id()),
            stream: Some(stream),
            read: ReusableBoxFuture::new(std::future::pending()),
        }
    }
}

impl quic::RecvStream for Recv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let Some(mut stream) = self.stream.take() {
            self.read.set(async move {
                let chunk = stream.read_chunk(usize::MAX, true).await;
                (stream, chunk)
            });
        }
        let (stream, chunk) = ready!(self.read.poll(cx));
        self.stream = Some(stream);
        self.read.set(std::future::pending());
        Poll::Ready(chunk.map(|c| c.map(|c| c.bytes)).map_err(read_error))
    }

    fn stop_sending(&mut self, error_code: u64) {
        match self.stream.as_mut() {
            Some(s) => {
                let _ = s.stop(varint(error_code));
            }
            // Mid-read: dropping the read drops the stream, which stops it (code 0).
            None => self.read.set(std::future::pending()),
        }
    }

    fn recv_id(&self) -> StreamId {
        self.id
    }
}

/// The sending side of a stream. A quinn stream dropped without `finish` is finished by
/// quinn; every caller here resets a stream it abandons (see `bridge`), so a truncated body
/// never reads as a complete one.
pub(crate) struct Send {
    stream: quinn::SendStream,
    id: StreamId,
    writing: Option<WriteBuf<Bytes>>,
}

impl Send {
    fn new(stream: quinn::SendStream) -> Self {
        Send {
            id: stream_id(stream.id()),
            stream,
            writing: None,
        }
    }
}

impl quic::SendStream<Bytes> for Send {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(data) = &mut self.writing {
            while data.has_remaining() {
                let n = ready!(Pin::new(&mut self.stream).poll_write(cx, data.chunk()))
                    .map_err(write_error)?;
                data.advance(n);
            }
        }
        self.writing = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            // h3 waits for poll_ready before each frame; this is a misuse, not a peer's doing.
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "send_data while a frame is still being written".into(),
                ),
            });
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        let _ = self.stream.reset(varint(reset_code));
    }

    fn send_id(&self) -> StreamId {
        self.id
    }
}
