//! Moving HTTP messages between an in-memory HTTP/2 connection (hyper) and HTTP/3 streams:
//! bodies with their trailers, and cancellation both ways. A message that cannot finish is
//! reset on the other side, never ended as if it were complete: a dropped h3 body sends
//! STOP_SENDING, an h2 body that fails resets its h3 stream, and an h3 stream reset becomes a
//! body error carrying the matching HTTP/2 reason (which hyper turns into RST_STREAM).

use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;

use super::streams;

/// An error crossing the bridge, with the HTTP/2 reason hyper resets the stream with (hyper
/// looks for an `h2::Error` among the sources).
#[derive(Debug)]
pub(crate) struct BridgeError {
    h2: h2::Error,
    what: String,
}

impl BridgeError {
    pub(crate) fn new(reason: h2::Reason, what: impl Into<String>) -> Self {
        BridgeError {
            h2: h2::Error::from(reason),
            what: what.into(),
        }
    }

    /// A stream's failure on the HTTP/3 side, as the HTTP/2 side should see it: a request the
    /// peer rejected unprocessed (`H3_REQUEST_REJECTED`, or it is going away) is REFUSED_STREAM,
    /// so the caller's retry logic sends it again elsewhere, exactly as over HTTP/2.
    pub(crate) fn from_h3(e: &StreamError) -> Self {
        let reason = match e {
            StreamError::RemoteClosing => h2::Reason::REFUSED_STREAM,
            StreamError::RemoteTerminate { code } => h2_reason(*code),
            _ => h2::Reason::INTERNAL_ERROR,
        };
        BridgeError::new(reason, format!("HTTP/3 stream: {e}"))
    }
}

impl std::fmt::Display for BridgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for BridgeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.h2)
    }
}

/// An HTTP/3 reset code as an HTTP/2 one.
pub(crate) fn h2_reason(code: Code) -> h2::Reason {
    if code == Code::H3_REQUEST_REJECTED {
        h2::Reason::REFUSED_STREAM
    } else if code == Code::H3_REQUEST_CANCELLED || code == Code::H3_NO_ERROR {
        h2::Reason::CANCEL
    } else {
        h2::Reason::INTERNAL_ERROR
    }
}

/// An HTTP/2 reset reason (found in a body's error) as an HTTP/3 code.
pub(crate) fn h3_code(e: &(dyn std::error::Error + 'static)) -> Code {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) => Code::H3_REQUEST_REJECTED,
                Some(h2::Reason::CANCEL) => Code::H3_REQUEST_CANCELLED,
                _ => Code::H3_INTERNAL_ERROR,
            };
        }
        cur = err.source();
    }
    Code::H3_REQUEST_CANCELLED
}

/// The receiving half of a request stream (server) or response stream (client).
pub(crate) trait H3Recv: Send + Unpin + 'static {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, StreamError>>;
    fn stop(&mut self, code: Code);
}

/// The sending half of a stream.
pub(crate) trait H3Send: Send + 'static {
    fn data(&mut self, b: Bytes) -> impl Future<Output = Result<(), StreamError>> + Send;
    fn trailers(&mut self, t: HeaderMap) -> impl Future<Output = Result<(), StreamError>> + Send;
    fn finish(&mut self) -> impl Future<Output = Result<(), StreamError>> + Send;
    fn reset(&mut self, code: Code);
}

macro_rules! h3_halves {
    ($($side:ident),*) => {$(
        impl H3Recv for h3::$side::RequestStream<streams::Recv, Bytes> {
            fn poll_data(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<Bytes>, StreamError>> {
                let data = ready!(self.poll_recv_data(cx));
                Poll::Ready(data.map(|d| d.map(|mut b| b.copy_to_bytes(b.remaining()))))
            }

            fn poll_trailers(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<HeaderMap>, StreamError>> {
                self.poll_recv_trailers(cx)
            }

            fn stop(&mut self, code: Code) {
                self.stop_sending(code);
            }
        }

        impl H3Send for h3::$side::RequestStream<streams::Send, Bytes> {
            async fn data(&mut self, b: Bytes) -> Result<(), StreamError> {
                self.send_data(b).await
            }

            async fn trailers(&mut self, t: HeaderMap) -> Result<(), StreamError> {
                self.send_trailers(t).await
            }

            async fn finish(&mut self) -> Result<(), StreamError> {
                h3::$side::RequestStream::finish(self).await
            }

            fn reset(&mut self, code: Code) {
                self.stop_stream(code);
            }
        }
    )*};
}

h3_halves!(client, server);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Data,
    Trailers,
    Done,
}

/// An HTTP/3 message body (data, then trailers) as an `http_body::Body`. Dropped before its
/// end, it tells the peer to stop sending (the reader went away: a cancel).
pub(crate) struct H3Body<R: H3Recv> {
    recv: R,
    phase: Phase,
    /// A frame read ahead by [`H3Body::peek`] or [`H3Body::settle`].
    pending: Option<Result<Frame<Bytes>, BridgeError>>,
}

impl<R: H3Recv> H3Body<R> {
    pub(crate) fn new(recv: R) -> Self {
        H3Body {
            recv,
            phase: Phase::Data,
            pending: None,
        }
    }

    /// Reads what has already arrived, without waiting. HTTP/3 has no END_STREAM flag on a
    /// HEADERS frame: a message without a body is a head and then the stream's end, usually in
    /// the same packet. Seen here, the HTTP/2 side can send HEADERS with END_STREAM (a GET
    /// stays bodiless; a gRPC trailers-only answer stays trailers-only).
    pub(crate) fn peek(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(f) = self.poll_next(&mut cx) {
            self.pending = f;
        }
    }

    /// Waits for the first frame (or the end): for a head that says the message is complete
    /// (gRPC's trailers-only answer), whose end must reach HTTP/2 with the head.
    pub(crate) async fn settle(&mut self) {
        let f = std::future::poll_fn(|cx| self.poll_next(cx)).await;
        self.pending = f;
    }

    /// The stream, for reading what precedes the body (a response's head).
    pub(crate) fn recv_mut(&mut self) -> &mut R {
        &mut self.recv
    }
}

impl<R: H3Recv> Body for H3Body<R> {
    type Data = Bytes;
    type Error = BridgeError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BridgeError>>> {
        let this = self.get_mut();
        if let Some(f) = this.pending.take() {
            return Poll::Ready(Some(f));
        }
        this.poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.phase == Phase::Done
    }
}

impl<R: H3Recv> H3Body<R> {
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BridgeError>>> {
        let this = self;
        loop {
            match this.phase {
                Phase::Data => match ready!(this.recv.poll_data(cx)) {
                    Ok(Some(b)) if b.is_empty() => continue,
                    Ok(Some(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                    Ok(None) => this.phase = Phase::Trailers,
                    Err(e) => {
                        this.phase = Phase::Done;
                        return Poll::Ready(Some(Err(BridgeError::from_h3(&e))));
                    }
                },
                Phase::Trailers => {
                    let t = ready!(this.recv.poll_trailers(cx));
                    this.phase = Phase::Done;
                    return Poll::Ready(match t {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(BridgeError::from_h3(&e))),
                    });
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }
}

impl<R: H3Recv> Drop for H3Body<R> {
    fn drop(&mut self) {
        if self.phase != Phase::Done {
            self.recv.stop(Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// Sends `body` on `out`: data frames, trailers, then the end of the stream. A body that
/// fails (its sender reset it) resets the stream with the matching code; a peer that stops
/// reading ends the copy (the stream is reset so nothing half-sent looks complete).
pub(crate) async fn pipe<B, S>(body: B, out: &mut S)
where
    B: Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S: H3Send,
{
    let body = std::pin::pin!(body);
    let mut body = body;
    loop {
        let frame = match body.frame().await {
            None => {
                let _ = out.finish().await;
                return;
            }
            Some(Err(e)) => {
                let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                out.reset(h3_code(e.as_ref()));
                return;
            }
            Some(Ok(f)) => f,
        };
        let sent = match frame.into_data() {
            Ok(d) if d.is_empty() => Ok(()),
            Ok(d) => out.data(d).await,
            Err(f) => match f.into_trailers() {
                Ok(t) => match out.trailers(t).await {
                    Ok(()) => {
                        let _ = out.finish().await;
                        return;
                    }
                    Err(e) => Err(e),
                },
                Err(_) => Ok(()),
            },
        };
        if sent.is_err() {
            out.reset(Code::H3_REQUEST_CANCELLED);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_codes_map_both_ways() {
        // A request the peer never processed stays replayable on the other side, a cancel
        // stays a cancel, anything else is an internal error (never a clean end).
        let table = [
            (Code::H3_REQUEST_REJECTED, h2::Reason::REFUSED_STREAM),
            (Code::H3_REQUEST_CANCELLED, h2::Reason::CANCEL),
            (Code::H3_NO_ERROR, h2::Reason::CANCEL),
            (Code::H3_INTERNAL_ERROR, h2::Reason::INTERNAL_ERROR),
            (Code::H3_MESSAGE_ERROR, h2::Reason::INTERNAL_ERROR),
        ];
        for (h3, h2) in table {
            assert_eq!(h2_reason(h3), h2, "{h3:?}");
        }
        let back = [
            (h2::Reason::REFUSED_STREAM, Code::H3_REQUEST_REJECTED),
            (h2::Reason::CANCEL, Code::H3_REQUEST_CANCELLED),
            (h2::Reason::INTERNAL_ERROR, Code::H3_INTERNAL_ERROR),
            (h2::Reason::STREAM_CLOSED, Code::H3_INTERNAL_ERROR),
        ];
        for (h2, h3) in back {
            let e = BridgeError::new(h2, "x");
            assert_eq!(h3_code(&e), h3, "{h2:?}");
        }
        // A body error that carries no HTTP/2 reason: the sender went away.
        let plain = std::io::Error::other("gone");
        assert_eq!(h3_code(&plain), Code::H3_REQUEST_CANCELLED);
        assert_eq!(
            BridgeError::from_h3(&StreamError::RemoteClosing)
                .h2
                .reason(),
            Some(h2::Reason::REFUSED_STREAM)
        );
    }
}
