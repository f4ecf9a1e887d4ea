//! Request bodies that can be sent again when the upstream provably never processed them.
//!
//! An HTTP/2 stream refused with `REFUSED_STREAM`, or cut by a graceful `GOAWAY` before the
//! server accepted it, was never seen by the application (RFC 9113 §8.7), so resending it is
//! safe — if we still have the body. hyper consumes the body it sends, so [`Recording`] keeps a
//! copy of what it passes on (reference-counted `Bytes`, no copying), up to [`MAX_REPLAY`]; once
//! the body has ended within that bound, [`Replay::body`] yields it again.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::scrub::Scrubbed;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// Bodies larger than this are streamed without a copy and are not replayed.
pub const MAX_REPLAY: usize = 64 * 1024;

#[derive(Default)]
struct Copy {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    ended: bool,
    overflow: bool,
    /// The client's body, given back when hyper drops the attempt before reading all of it
    /// (a stream refused at open is never read at all).
    rest: Option<Scrubbed>,
    /// The attempt's body still exists (hyper holds it).
    alive: bool,
}

/// The upstream request body: the client's, as is (HTTP/1, and any body that had already ended),
/// recorded (HTTP/2), or replayed.
pub enum UpstreamBody {
    Plain(Scrubbed),
    Recording(Recording),
    /// Boxed: a replay is rare, and every request's future carries this enum several times
    /// over (`Replayed` is 184 bytes, `Plain` 56).
    Replayed(Box<Replayed>),
}

pub struct Recording {
    inner: Option<Scrubbed>,
    copy: Arc<Mutex<Copy>>,
    dropped: Arc<tokio::sync::Notify>,
}

impl Drop for Recording {
    fn drop(&mut self) {
        let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        copy.alive = false;
        if !copy.ended {
            copy.rest = self.inner.take();
        }
        drop(copy);
        self.dropped.notify_one();
    }
}

/// What was recorded, then whatever of the client's body was not read yet.
pub struct Replayed {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Scrubbed>,
}

/// A handle on a recording, kept by whoever may need to resend.
pub struct Replay(Kept);

enum Kept {
    /// The body had ended before it was sent (most requests: a GET, a bodiless POST): there
    /// is nothing to record, and no allocation per request for it. Nothing to wait for
    /// either: [`Replay::settled`] and [`Replay::body`] answer at once, where a recording
    /// waits for hyper to let go of the attempt's body.
    Empty,
    /// A body already replayed once: it is not replayed twice.
    Nothing,
    Recorded {
        copy: Arc<Mutex<Copy>>,
        dropped: Arc<tokio::sync::Notify>,
    },
}

impl Replay {
    fn none() -> Self {
        Replay(Kept::Nothing)
    }

    /// [`Replay::body`] can give the body again: it ended within [`MAX_REPLAY`] (then any
    /// number of times, once the attempt lets go of it), or the attempt gave back the unread
    /// rest (once).
    pub fn complete(&self) -> bool {
        let copy = match &self.0 {
            Kept::Empty => return true,
            Kept::Nothing => return false,
            Kept::Recorded { copy, .. } => copy.lock().unwrap_or_else(|p| p.into_inner()),
        };
        !copy.overflow && (copy.ended || (!copy.alive && copy.rest.is_some()))
    }

    /// Waits (at most `max`) for the attempt to let go of the body — hyper sends a request
    /// body on its own after the response head has come — then says whether it is
    /// [`Replay::complete`].
    pub async fn settled(&self, max: std::time::Duration) -> bool {
        let _ = self.released(max).await;
        self.complete()
    }

    /// Waits (at most `max`) until the attempt has dropped the body; false on timeout.
    async fn released(&self, max: std::time::Duration) -> bool {
        let Kept::Recorded { copy, dropped } = &self.0 else {
            return true;
        };
        let wait = async {
            loop {
                let notified = dropped.notified();
                if !copy.lock().unwrap_or_else(|p| p.into_inner()).alive {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(max, wait).await.is_ok()
    }

    /// The body again: the recorded part, then the unread rest. `None` when more than
    /// [`MAX_REPLAY`] was read, or the failed attempt never let go of the body.
    pub async fn body(&self) -> Option<UpstreamBody> {
        let copy = match &self.0 {
            Kept::Empty => return Some(UpstreamBody::empty()),
            Kept::Nothing => return None,
            Kept::Recorded { copy, .. } => copy,
        };
        // hyper drops the failed attempt's body on its connection task, which may run a moment
        // after we hear of the failure.
        if !self.released(std::time::Duration::from_secs(1)).await {
            return None;
        }
        let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
        if copy.overflow || !(copy.ended || copy.rest.is_some()) {
            return None;
        }
        Some(UpstreamBody::Replayed(Box::new(Replayed {
            chunks: copy.chunks.iter().cloned().collect(),
            trailers: copy.trailers.clone(),
            rest: copy.rest.take(),
        })))
    }
}

impl UpstreamBody {
    /// Prepares a body for a send that may need repeating: the client's body is recorded; a
    /// replayed one is sent as it is (it will not be repeated twice).
    pub fn recording(self) -> (UpstreamBody, Replay) {
        let inner = match self {
            UpstreamBody::Plain(i) => i,
            // Already recorded (a policy retry records before the endpoint does): one
            // recording, two handles on it.
            UpstreamBody::Recording(r) => {
                let replay = Replay(Kept::Recorded {
                    copy: r.copy.clone(),
                    dropped: r.dropped.clone(),
                });
                return (UpstreamBody::Recording(r), replay);
            }
            replayed @ UpstreamBody::Replayed(_) => return (replayed, Replay::none()),
        };
        if inner.is_end_stream() {
            return (UpstreamBody::Plain(inner), Replay(Kept::Empty));
        }
        let copy = Arc::new(Mutex::new(Copy {
            alive: true,
            ..Copy::default()
        }));
        let dropped = Arc::new(tokio::sync::Notify::new());
        let replay = Replay(Kept::Recorded {
            copy: copy.clone(),
            dropped: dropped.clone(),
        });
        let body = Recording {
            inner: Some(inner),
            copy,
            dropped,
        };
        (UpstreamBody::Recording(body), replay)
    }

    /// A body with nothing in it (for resending a bodiless request).
    /// Makes every frame the client still sends count as activity of its exchange (a
    /// replayed body is the proxy's own copy: nothing to count).
    pub(crate) fn count_activity(&mut self, activity: Arc<crate::idle::Activity>) {
        match self {
            UpstreamBody::Plain(b) => b.count_activity(activity),
            UpstreamBody::Recording(r) => {
                if let Some(b) = r.inner.as_mut() {
                    b.count_activity(activity);
                }
            }
            UpstreamBody::Replayed(_) => {}
        }
    }

    pub fn empty() -> Self {
        UpstreamBody::Replayed(Box::new(Replayed {
            chunks: VecDeque::new(),
            trailers: None,
            rest: None,
        }))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Plain(i) => Pin::new(i).poll_frame(cx),
            UpstreamBody::Recording(r) => {
                let Some(inner) = r.inner.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = std::task::ready!(Pin::new(&mut *inner).poll_frame(cx));
                let inner_ended = inner.is_end_stream();
                let mut copy = r.copy.lock().unwrap_or_else(|p| p.into_inner());
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(data) = f.data_ref() {
                            if !copy.overflow && copy.len + data.len() <= MAX_REPLAY {
                                copy.len += data.len();
                                copy.chunks.push(data.clone());
                            } else {
                                copy.overflow = true;
                                copy.chunks = Vec::new();
                            }
                        } else if let Some(t) = f.trailers_ref() {
                            copy.trailers = Some(t.clone());
                        }
                        if inner_ended {
                            copy.ended = true;
                        }
                    }
                    None => copy.ended = true,
                    Some(Err(_)) => copy.overflow = true,
                }
                Poll::Ready(frame)
            }
            UpstreamBody::Replayed(r) => {
                if let Some(c) = r.chunks.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(c))));
                }
                if let Some(rest) = r.rest.as_mut() {
                    return Pin::new(rest).poll_frame(cx);
                }
                Poll::Ready(r.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain(i) => i.is_end_stream(),
            UpstreamBody::Recording(r) => r.inner.as_ref().is_none_or(|i| i.is_end_stream()),
            UpstreamBody::Replayed(r) => {
                r.chunks.is_empty()
                    && r.trailers.is_none()
                    && r.rest.as_ref().is_none_or(|i| i.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain(i) => i.size_hint(),
            UpstreamBody::Recording(r) => {
                r.inner.as_ref().map(|i| i.size_hint()).unwrap_or_default()
            }
            UpstreamBody::Replayed(r) => {
                let recorded: u64 = r.chunks.iter().map(|c| c.len() as u64).sum();
                match &r.rest {
                    None => SizeHint::with_exact(recorded),
                    Some(rest) => {
                        let h = rest.size_hint();
                        let mut hint = SizeHint::new();
                        hint.set_lower(recorded + h.lower());
                        if let Some(u) = h.upper() {
                            hint.set_upper(recorded + u);
                        }
                        hint
                    }
                }
            }
        }
    }
}

/// True when an HTTP/2 request failed in a way that proves the server never processed it.
pub fn never_processed(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::convert::Infallible;

    /// A client's request body as the proxy receives it: a real `Incoming` from an HTTP/1.1
    /// server over an in-memory stream, carrying `body`. The connections live as long as the
    /// runtime (the server never answers: the tests only need the body).
    async fn incoming<B>(body: B) -> Scrubbed
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Incoming>();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let _ = tx.send(req.into_body());
                std::future::pending::<Result<http::Response<Empty<Bytes>>, Infallible>>()
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server_io), service)
                .await;
        });
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/upload").body(body).unwrap();
        tokio::spawn(async move {
            let _ = sender.send_request(req).await;
        });
        Scrubbed::new(
            rx.recv().await.unwrap(),
            Arc::new(crate::scrub::Rules::default()),
        )
    }

    fn payload(n: usize) -> Bytes {
        (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
    }

    async fn read_all(b: UpstreamBody) -> Bytes {
        b.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_body_sent_in_full_is_replayed() {
        let sent = payload(10_000);
        let (body, replay) =
            UpstreamBody::Plain(incoming(Full::new(sent.clone())).await).recording();
        // The first attempt passes the body on whole (hyper reads it all), then fails.
        assert_eq!(read_all(body).await, sent);
        let again = replay.body().await.expect("replayable");
        assert!(matches!(again, UpstreamBody::Replayed(_)));
        assert_eq!(read_all(again).await, sent);
    }

    #[tokio::test]
    async fn a_body_that_had_ended_is_passed_on_as_is_and_replayed_empty() {
        // A GET (or any request without a body): nothing to record, nothing allocated for it.
        let (body, replay) = UpstreamBody::Plain(incoming(Empty::<Bytes>::new()).await).recording();
        assert!(matches!(body, UpstreamBody::Plain(_)), "not recorded");
        assert!(body.is_end_stream());
        assert!(replay.complete());
        assert!(replay.settled(std::time::Duration::ZERO).await);
        drop(body);
        for _ in 0..2 {
            let again = replay
                .body()
                .await
                .expect("an empty body replays any number of times");
            assert!(again.is_end_stream());
            assert_eq!(read_all(again).await, Bytes::new());
        }
        // A recording of it (a policy retry records before the endpoint does) is no different.
        let (again, _) = replay.body().await.expect("replayable").recording();
        assert!(again.is_end_stream());
    }

    #[tokio::test]
    async fn a_body_never_read_is_replayed_whole() {
        // A stream refused at open: hyper drops the body without reading any of it.
        let sent = payload(3_000);
        let (body, replay) =
            UpstreamBody::Plain(incoming(Full::new(sent.clone())).await).recording();
        drop(body);
        assert_eq!(
            read_all(replay.body().await.expect("replayable")).await,
            sent
        );
    }

    #[tokio::test]
    async fn a_body_read_in_part_replays_the_recording_then_the_rest() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
        });
        let (body, replay) =
            UpstreamBody::Plain(incoming(StreamBody::new(chunks)).await).recording();
        let mut body = body;
        tx.send(Bytes::from_static(b"first ")).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap(), &Bytes::from_static(b"first "));
        // The attempt fails after one chunk; the client is still sending.
        drop(body);
        let again = replay.body().await.expect("replayable");
        tx.send(Bytes::from_static(b"second")).await.unwrap();
        drop(tx);
        assert_eq!(read_all(again).await, Bytes::from_static(b"first second"));
    }

    #[tokio::test]
    async fn a_body_up_to_the_bound_is_replayed_and_beyond_it_is_not() {
        let at = payload(MAX_REPLAY);
        let (body, replay) = UpstreamBody::Plain(incoming(Full::new(at.clone())).await).recording();
        assert_eq!(read_all(body).await, at);
        assert_eq!(
            read_all(replay.body().await.expect("at the bound")).await,
            at
        );

        let over = payload(MAX_REPLAY + 1);
        let (body, replay) =
            UpstreamBody::Plain(incoming(Full::new(over.clone())).await).recording();
        // Streamed on unchanged; only the copy is given up.
        assert_eq!(read_all(body).await, over);
        assert!(replay.body().await.is_none(), "replayed beyond MAX_REPLAY");
    }

    #[tokio::test]
    async fn a_replayed_body_is_not_recorded_again() {
        let sent = payload(100);
        let (body, replay) =
            UpstreamBody::Plain(incoming(Full::new(sent.clone())).await).recording();
        drop(body);
        let again = replay.body().await.expect("replayable");
        let (third, replay) = again.recording();
        assert_eq!(read_all(third).await, sent);
        assert!(
            replay.body().await.is_none(),
            "a body is resent once at most"
        );
    }

    /// An HTTP/2 server that resets every stream with `reason`, over an in-memory stream;
    /// returns what the client's request ended with.
    async fn reset_with(reason: h2::Reason) -> hyper::Error {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(server_io).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                respond.send_reset(reason);
            }
        });
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://peer.test/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.send_request(req).await.unwrap_err()
    }

    #[tokio::test]
    async fn refused_streams_are_never_processed_and_other_resets_may_be() {
        assert!(never_processed(
            &reset_with(h2::Reason::REFUSED_STREAM).await
        ));
        assert!(!never_processed(
            &reset_with(h2::Reason::INTERNAL_ERROR).await
        ));
        assert!(!never_processed(&reset_with(h2::Reason::CANCEL).await));
    }
}
