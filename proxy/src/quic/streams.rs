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
        Poll::Ready(
            res.map(|r| Recv::new(r, FrameLimit::Total(0)))
                .map_err(connection_error),
        )
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
            recv: Recv::new(recv, FrameLimit::frames()),
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
            recv: Recv::new(recv, FrameLimit::frames()),
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
    frames: FrameLimit,
}

impl Recv {
    fn new(stream: quinn::RecvStream, frames: FrameLimit) -> Self {
        Recv {
            id: stream_id(stream.id()),
            stream: Some(stream),
            read: ReusableBoxFuture::new(std::future::pending()),
            frames,
        }
    }
}

/// The largest HTTP/3 frame other than DATA a peer may send: a head (or trailers) at the
/// HTTP/2 limit, with room for QPACK's overhead. h3 buffers such a frame whole before it looks
/// at its size, and reading it re-opens QUIC's flow-control window, so without this a peer
/// could declare a 2^61-byte HEADERS frame and grow our memory for as long as it sends.
const MAX_FRAME: u64 = super::MAX_FIELD_SECTION + 16 * 1024;

/// Bytes a unidirectional stream may carry in all (control and QPACK streams: SETTINGS,
/// GOAWAY, a few instructions; this proxy's QPACK is static-only).
const MAX_UNI_BYTES: u64 = 64 * 1024;

/// Follows the HTTP/3 frame boundaries of what a stream delivers, refusing any frame other
/// than DATA longer than [`MAX_FRAME`] (DATA is streamed by h3, never buffered whole).
pub(crate) enum FrameLimit {
    /// A request or response stream: frames from the first byte.
    Frames(FrameState),
    /// A unidirectional stream: bytes counted against [`MAX_UNI_BYTES`].
    Total(u64),
}

pub(crate) enum FrameState {
    /// Reading the frame type, then its length, as QUIC varints (bytes so far, value).
    Type(Varint),
    Len(u64, Varint),
    /// Inside a frame's payload: bytes left.
    Payload(u64),
}

#[derive(Default)]
pub(crate) struct Varint {
    need: u8,
    value: u64,
}

impl Varint {
    /// Feeds one byte; `Some(value)` when the varint is complete.
    fn push(&mut self, b: u8) -> Option<u64> {
        if self.need == 0 {
            self.need = 1 << (b >> 6);
            self.value = u64::from(b & 0x3f);
        } else {
            self.value = (self.value << 8) | u64::from(b);
        }
        self.need -= 1;
        (self.need == 0).then_some(self.value)
    }
}

impl FrameLimit {
    fn frames() -> Self {
        FrameLimit::Frames(FrameState::Type(Varint::default()))
    }

    /// Checks one chunk; `Err` names what the peer did wrong.
    fn check(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        let state = match self {
            FrameLimit::Total(n) => {
                *n += chunk.len() as u64;
                if *n > MAX_UNI_BYTES {
                    return Err(format!("unidirectional stream over {MAX_UNI_BYTES} bytes"));
                }
                return Ok(());
            }
            FrameLimit::Frames(s) => s,
        };
        while !chunk.is_empty() {
            match state {
                FrameState::Payload(left) => {
                    let n = (*left).min(chunk.len() as u64);
                    *left -= n;
                    chunk = &chunk[n as usize..];
                    if *left == 0 {
                        *state = FrameState::Type(Varint::default());
                    }
                }
                FrameState::Type(v) => {
                    let b = chunk[0];
                    chunk = &chunk[1..];
                    if let Some(ty) = v.push(b) {
                        *state = FrameState::Len(ty, Varint::default());
                    }
                }
                FrameState::Len(ty, v) => {
                    let b = chunk[0];
                    chunk = &chunk[1..];
                    if let Some(len) = v.push(b) {
                        // DATA (type 0) is streamed; every other frame is buffered whole.
                        if *ty != 0 && len > MAX_FRAME {
                            return Err(format!(
                                "HTTP/3 frame of type {ty:#x} declares {len} bytes (at most {MAX_FRAME})"
                            ));
                        }
                        *state = if len == 0 {
                            FrameState::Type(Varint::default())
                        } else {
                            FrameState::Payload(len)
                        };
                    }
                }
            }
        }
        Ok(())
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
        let chunk = chunk.map(|c| c.map(|c| c.bytes)).map_err(read_error)?;
        if let Some(bytes) = &chunk
            && let Err(why) = self.frames.check(bytes)
        {
            // H3_EXCESSIVE_LOAD (RFC 9114 §8.1): stop the stream; h3 sees it fail.
            self.stop_sending(0x0107);
            return Poll::Ready(Err(StreamErrorIncoming::Unknown(why.into())));
        }
        Poll::Ready(Ok(chunk))
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

/// The sending side of a stream: finished explicitly, reset otherwise (see its `Drop`), so a
/// truncated body never reads as a complete one.
pub(crate) struct Send {
    stream: quinn::SendStream,
    id: StreamId,
    writing: Option<WriteBuf<Bytes>>,
    /// Finished or reset: nothing more to say when dropped.
    closed: bool,
}

impl Send {
    fn new(stream: quinn::SendStream) -> Self {
        Send {
            id: stream_id(stream.id()),
            stream,
            writing: None,
            closed: false,
        }
    }
}

/// quinn finishes a stream dropped unfinished, which would end a half-written frame or body as
/// if it were complete (a cancelled call in the middle of its head, a task cut by the drain
/// deadline): reset it instead.
impl Drop for Send {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.stream.reset(varint(0x010c)); // H3_REQUEST_CANCELLED
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

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        // What is still being written goes out first; the end must follow the last frame.
        ready!(quic::SendStream::poll_ready(self, cx))?;
        self.closed = true;
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        self.closed = true;
        let _ = self.stream.reset(varint(reset_code));
    }

    fn send_id(&self) -> StreamId {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, len: usize) -> Vec<u8> {
        // Types and lengths below 2^14 as two-byte varints.
        let mut f = vec![ty];
        f.extend_from_slice(&(0x4000u16 | len as u16).to_be_bytes());
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    #[test]
    fn frames_are_followed_across_chunks_and_oversized_heads_refused() {
        // HEADERS, DATA, trailers: fine, however the bytes are cut.
        let mut ok = frame(1, 300);
        ok.extend(frame(0, 9000));
        ok.extend(frame(1, 40));
        for cut in [1, 2, 3, 7, 1000] {
            let mut limit = FrameLimit::frames();
            for chunk in ok.chunks(cut) {
                assert_eq!(limit.check(chunk), Ok(()), "cut {cut}");
            }
        }
        // A HEADERS frame declaring 2^61 bytes, an unknown frame type declaring 1 MiB.
        let huge = [0x01, 0xe0, 0, 0, 0, 0, 0, 0, 0];
        let err = FrameLimit::frames().check(&huge).unwrap_err();
        assert!(err.contains("type 0x1"), "{err}");
        let unknown = [0x21, 0x80, 0x10, 0x00, 0x00];
        assert!(FrameLimit::frames().check(&unknown).is_err());
        // DATA may be as long as it likes: it is streamed, not buffered.
        let data = [0x00, 0xc0, 0, 0, 0, 0x10, 0, 0, 0];
        assert_eq!(FrameLimit::frames().check(&data), Ok(()));
        // Unidirectional streams: bytes in all.
        let mut uni = FrameLimit::Total(0);
        assert!(uni.check(&[0; 60 * 1024]).is_ok());
        assert!(uni.check(&[0; 8 * 1024]).is_err());
    }
}
