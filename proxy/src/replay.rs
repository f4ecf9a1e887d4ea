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

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Bodies larger than this are streamed without a copy and are not replayed.
pub const MAX_REPLAY: usize = 64 * 1024;

#[derive(Default)]
struct Copy {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    ended: bool,
    overflow: bool,
}

/// The upstream request body: the client's, as is (HTTP/1), recorded (HTTP/2), or replayed.
pub enum UpstreamBody {
    Plain(Incoming),
    Recording(Recording),
    Replayed(Replayed),
}

pub struct Recording {
    inner: Incoming,
    copy: Arc<Mutex<Copy>>,
}

pub struct Replayed {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

/// A handle on a recording, kept by whoever may need to resend.
pub struct Replay(Arc<Mutex<Copy>>);

impl Replay {
    /// The body again, if it ended within [`MAX_REPLAY`].
    pub fn body(&self) -> Option<UpstreamBody> {
        let copy = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !copy.ended || copy.overflow {
            return None;
        }
        Some(UpstreamBody::Replayed(Replayed {
            chunks: copy.chunks.iter().cloned().collect(),
            trailers: copy.trailers.clone(),
        }))
    }
}

impl UpstreamBody {
    /// Wraps a body so it can be replayed; returns the body to send and the replay handle.
    pub fn recording(inner: Incoming) -> (UpstreamBody, Replay) {
        let copy = Arc::new(Mutex::new(Copy {
            ended: inner.is_end_stream(),
            ..Copy::default()
        }));
        let replay = Replay(copy.clone());
        (UpstreamBody::Recording(Recording { inner, copy }), replay)
    }

    /// The client's body back, when it was never touched (`Plain`).
    pub fn into_incoming(self) -> Option<Incoming> {
        match self {
            UpstreamBody::Plain(i) => Some(i),
            UpstreamBody::Recording(r) => Some(r.inner),
            UpstreamBody::Replayed(_) => None,
        }
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
                let frame = std::task::ready!(Pin::new(&mut r.inner).poll_frame(cx));
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
                        if r.inner.is_end_stream() {
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
                Poll::Ready(r.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain(i) => i.is_end_stream(),
            UpstreamBody::Recording(r) => r.inner.is_end_stream(),
            UpstreamBody::Replayed(r) => r.chunks.is_empty() && r.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain(i) => i.size_hint(),
            UpstreamBody::Recording(r) => r.inner.size_hint(),
            UpstreamBody::Replayed(r) => {
                SizeHint::with_exact(r.chunks.iter().map(|c| c.len() as u64).sum())
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
