//! The destination policy's idle timeout (`remora.io/idle-timeout`): an outbound exchange whose
//! request and response bodies carry no frame in either direction for that long is ended. A
//! gRPC response gets `grpc-status: 4` (DEADLINE_EXCEEDED) in trailers; any other response body
//! fails, so hyper resets the HTTP/2 stream or closes the HTTP/1 connection (the client sees an
//! error, never a body that merely stops). Either way the upstream stream is dropped, which
//! cancels it (HTTP/2 `RST_STREAM`) or closes its connection (HTTP/1).
//!
//! The watchdog is armed when the response head arrives. Before that, the request timeout
//! (`remora.io/timeout`, `grpc-timeout`) is what bounds the wait: a server thinking before it
//! answers is not idle in a way the caller can see, and one deadline per phase keeps the two
//! knobs from fighting.
//!
//! Cost: nothing without an idle timeout. The request body then carries no [`Activity`] and the
//! response body no [`Watchdog`] (`None` in both: no timer, no allocation, one branch per
//! frame). With one, each frame stores a timestamp and the watchdog's single timer is re-armed
//! only when it fires early (a stream that is busy never has its timer reset per frame).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::hooks::Answered;
use crate::metrics::{Direction, ErrorKind, Metrics};
use crate::scrub::Scrubbed;

/// Longest path written to the idle timeout's log line: a path is client-controlled.
const MAX_LOGGED_PATH: usize = 256;

/// When either body of one exchange last carried a frame. Shared by the request body (polled
/// by hyper's connection task, sending upstream) and the response body's watchdog.
pub(crate) struct Activity {
    origin: Instant,
    /// Nanoseconds after `origin` of the last frame either way.
    last: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    /// A frame went by, now.
    pub(crate) fn touch(&self) {
        // 584 years of nanoseconds fit in a u64; saturate rather than wrap past that.
        let ns = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // `fetch_max`: two bodies touch from two tasks; the later time must win.
        self.last.fetch_max(ns, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// Why an upstream response body ended early. `pub` because it is the error of [`Streamed`],
/// which is part of the response type; the module itself is private.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The upstream's body failed (reset, connection lost).
    #[error("{0}")]
    Upstream(#[from] hyper::Error),
    /// No data either way for the destination's idle timeout.
    #[error(
        "{dst}: no data in either direction for {} (remora.io/idle-timeout); \
         raise it for this route (`; /PREFIX=DURATION`) if the stream is meant to be quiet",
        written(*after)
    )]
    Idle { dst: String, after: Duration },
}

pin_project_lite::pin_project! {
    /// The idle timer of one exchange, and what it needs to end the exchange and say so.
    /// Boxed, and only when a policy asks for it, so the common path never carries it.
    pub(crate) struct Watchdog {
        #[pin]
        sleep: Sleep,
        activity: Arc<Activity>,
        after: Duration,
        // The response is gRPC and the client speaks HTTP/2: end it with trailers, not an
        // error.
        grpc: bool,
        dst: String,
        path: String,
        direction: Direction,
        metrics: Arc<Metrics>,
    }
}

impl Watchdog {
    /// Ready once `after` has passed since the last frame either way.
    fn poll_expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            let due = this.activity.last() + *this.after;
            if due <= Instant::now() {
                return Poll::Ready(());
            }
            // Frames went by since the timer was set: wait out the rest from the last one.
            this.sleep.as_mut().reset(due);
        }
    }

    /// Counts and logs the ended stream; what the response body yields instead of more data.
    fn expire(&self) -> Result<Frame<Bytes>, BodyError> {
        self.metrics.error(self.direction, ErrorKind::IdleTimeout);
        tracing::debug!(
            dst = %self.dst,
            path = %self.path,
            idle_timeout = %written(self.after),
            "stream ended by the destination's idle timeout (remora.io/idle-timeout)"
        );
        if !self.grpc {
            return Err(BodyError::Idle {
                dst: self.dst.clone(),
                after: self.after,
            });
        }
        let mut t = HeaderMap::with_capacity(2);
        t.insert("grpc-status", HeaderValue::from_static("4"));
        // Printable ASCII without `%` needs no percent-encoding in grpc-message.
        let msg = format!(
            "idle timeout (remora.io/idle-timeout {})",
            written(self.after)
        );
        if let Ok(v) = HeaderValue::from_str(&msg) {
            t.insert("grpc-message", v);
        }
        Ok(Frame::trailers(t))
    }
}

/// An upstream's response body as the client receives it: scrubbed, and under the idle
/// watchdog when the destination's policy has an idle timeout for the request's path.
///
/// A wrapper rather than a field of [`Scrubbed`]: a watchdog must be able to fail the body,
/// and `Scrubbed` is also the request body, whose `hyper::Error` the endpoint code and the
/// retry recording rely on (a client's broken upload is recognised by it).
pub struct Streamed {
    /// `None` once the watchdog has ended the stream (dropping it cancels the upstream).
    body: Option<Scrubbed>,
    watchdog: Option<Pin<Box<Watchdog>>>,
    /// The endpoint that answered, for the layers above (hooks, metrics, the log line), until
    /// `Observe` takes it. Carried with the body rather than in the response's extensions,
    /// whose map cost three allocations (and their frees) per response.
    answered: Option<Answered>,
}

impl From<Scrubbed> for Streamed {
    fn from(body: Scrubbed) -> Streamed {
        Streamed {
            body: Some(body),
            watchdog: None,
            answered: None,
        }
    }
}

impl Streamed {
    /// An endpoint's answer: its body, and who answered.
    pub(crate) fn answered_by(body: Scrubbed, answered: Answered) -> Streamed {
        Streamed {
            answered: Some(answered),
            ..Streamed::from(body)
        }
    }

    pub(crate) fn answered(&self) -> Option<&Answered> {
        self.answered.as_ref()
    }

    pub(crate) fn take_answered(&mut self) -> Option<Answered> {
        self.answered.take()
    }
}

/// What [`arm`] needs besides the response: the exchange's shared clock and where the
/// request went (for the error, the log line and the metric).
pub(crate) struct Armed<'a> {
    pub(crate) activity: Arc<Activity>,
    pub(crate) after: Duration,
    pub(crate) dst: &'a str,
    pub(crate) path: &'a str,
    pub(crate) direction: Direction,
    pub(crate) metrics: &'a Arc<Metrics>,
    /// The client speaks HTTP/2, so trailers reach it (HTTP/1 drops them unless asked for).
    pub(crate) client_h2: bool,
}

/// Puts an upstream response under the idle watchdog, from now (its head has just come). A
/// response the proxy wrote itself, or one whose body has already ended, is left alone.
pub(crate) fn arm(rsp: &mut Response<crate::scrub::Body>, a: Armed<'_>) {
    // Trailers only where they are sure to arrive; otherwise a gRPC body fails like any other,
    // since trailers dropped on the way would read as a clean end.
    let grpc = a.client_h2
        && rsp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let http_body_util::Either::Left(streamed) = rsp.body_mut() else {
        return;
    };
    if streamed
        .body
        .as_ref()
        .is_none_or(http_body::Body::is_end_stream)
    {
        return;
    }
    // The head is activity: the first quiet spell counts from now.
    a.activity.touch();
    let mut path = a.path;
    if path.len() > MAX_LOGGED_PATH {
        let mut end = MAX_LOGGED_PATH;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        path = &path[..end];
    }
    streamed.watchdog = Some(Box::pin(Watchdog {
        sleep: tokio::time::sleep(a.after),
        activity: a.activity,
        after: a.after,
        grpc,
        dst: a.dst.to_string(),
        path: path.to_string(),
        direction: a.direction,
        metrics: a.metrics.clone(),
    }));
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            // Ended by the watchdog, whose last word has been said.
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        let Some(watchdog) = this.watchdog.as_mut() else {
            return polled.map(|f| f.map(|r| r.map_err(BodyError::from)));
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                watchdog.activity.touch();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(end) => {
                // Ended or failed by the upstream itself: nothing left to watch.
                this.watchdog = None;
                return Poll::Ready(end.map(|r| r.map_err(BodyError::from)));
            }
            Poll::Pending => {}
        }
        ready!(watchdog.as_mut().poll_expired(cx));
        let last = watchdog.expire();
        // Dropping the upstream body cancels its stream (HTTP/2) or closes its connection
        // (HTTP/1), so the server stops working for a caller that is gone.
        this.body = None;
        this.watchdog = None;
        Poll::Ready(Some(last))
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.body, &self.watchdog) {
            // A watched body may end early: promise no exact length.
            (Some(b), None) => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// A policy duration as an operator writes one: `500ms`, `30s`, `10m` (policies hold 1 ms … 1 h).
fn written(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0ms".to_string(),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ErrorLabels;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::convert::Infallible;
    use tokio::sync::mpsc;

    type Chunks =
        StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

    /// A body fed frame by frame through a channel; it ends when the sender is dropped.
    fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, Chunks) {
        let (tx, rx) = mpsc::channel::<Frame<Bytes>>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let f = rx.recv().await?;
            Some((Ok::<_, Infallible>(f), rx))
        });
        (tx, StreamBody::new(Box::pin(frames) as _))
    }

    /// One exchange as the outbound proxy sees it, over an in-memory HTTP/2 connection: the
    /// request body (a `Scrubbed` counting activity, drained by a task as hyper would drain it
    /// sending upstream) and the upstream's response body, scrubbed and armed with `after`.
    struct Exchange {
        /// The client's request body, frame by frame.
        upload: mpsc::Sender<Frame<Bytes>>,
        /// The upstream's response body, frame by frame.
        answer: mpsc::Sender<Frame<Bytes>>,
        body: Streamed,
        metrics: Arc<Metrics>,
    }

    async fn exchange(content_type: &'static str, after: Option<Duration>) -> Exchange {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (answer, answer_body) = channel_body();
        let activity = Activity::new();
        let counted = activity.clone();
        let answer_body = Arc::new(std::sync::Mutex::new(Some(answer_body)));
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let mut upload = Scrubbed::new(req.into_body(), Arc::default());
                upload.count_activity(counted.clone());
                tokio::spawn(async move { while upload.frame().await.is_some() {} });
                let body = answer_body.lock().unwrap().take().unwrap();
                let rsp = Response::builder()
                    .header("content-type", content_type)
                    .body(body)
                    .unwrap();
                std::future::ready(Ok::<_, Infallible>(rsp))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), svc)
                .await;
        });
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (upload, upload_body) = channel_body();
        let req = http::Request::post("http://upstream.test/pkg.Watch/All")
            .body(upload_body)
            .unwrap();
        let rsp = sender.send_request(req).await.unwrap();
        let mut rsp = rsp.map(|b| {
            http_body_util::Either::Left(Streamed::from(Scrubbed::new(b, Arc::default())))
        });
        let metrics = Arc::new(Metrics::new());
        if let Some(after) = after {
            arm(
                &mut rsp,
                Armed {
                    activity,
                    after,
                    dst: "upstream.test:80",
                    path: "/pkg.Watch/All",
                    direction: Direction::Outbound,
                    metrics: &metrics,
                    client_h2: true,
                },
            );
        }
        let http_body_util::Either::Left(body) = rsp.into_body() else {
            unreachable!("an upstream body");
        };
        Exchange {
            upload,
            answer,
            body,
            metrics,
        }
    }

    fn data(s: &'static str) -> Frame<Bytes> {
        Frame::data(Bytes::from_static(s.as_bytes()))
    }

    fn ended(m: &Metrics) -> u64 {
        m.errors
            .get_or_create(&ErrorLabels {
                direction: Direction::Outbound,
                kind: ErrorKind::IdleTimeout,
            })
            .get()
    }

    const AFTER: Duration = Duration::from_millis(500);

    #[tokio::test(start_paused = true)]
    async fn a_silent_grpc_stream_ends_with_deadline_exceeded_and_cancels_the_upstream() {
        let mut x = exchange("application/grpc", Some(AFTER)).await;
        drop(x.upload);
        x.answer.send(data("first")).await.unwrap();
        let f = x.body.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap(), "first");
        let quiet = Instant::now();
        let f = x.body.frame().await.unwrap().unwrap();
        assert_eq!(quiet.elapsed(), AFTER);
        let t = f.into_trailers().unwrap();
        assert_eq!(t["grpc-status"], "4");
        assert_eq!(
            t["grpc-message"],
            "idle timeout (remora.io/idle-timeout 500ms)"
        );
        assert!(x.body.frame().await.is_none());
        assert!(http_body::Body::is_end_stream(&x.body));
        // The upstream's stream was cancelled: its body is no longer read.
        x.answer.closed().await;
        assert_eq!(ended(&x.metrics), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_plain_body_fails_rather_than_ending_cleanly() {
        let mut x = exchange("text/plain", Some(AFTER)).await;
        drop(x.upload);
        x.answer.send(data("part")).await.unwrap();
        assert!(x.body.frame().await.unwrap().is_ok());
        let e = x.body.frame().await.unwrap().unwrap_err();
        assert!(matches!(e, BodyError::Idle { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("upstream.test:80") && msg.contains("500ms") && msg.contains("raise it"),
            "{msg}"
        );
        x.answer.closed().await;
        assert_eq!(ended(&x.metrics), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_keeps_sending_is_never_cut() {
        let mut x = exchange("application/grpc", Some(AFTER)).await;
        drop(x.upload);
        let answer = x.answer;
        tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                answer.send(data("tick")).await.unwrap();
            }
            let mut ok = HeaderMap::new();
            ok.insert("grpc-status", HeaderValue::from_static("0"));
            answer.send(Frame::trailers(ok)).await.unwrap();
        });
        let started = Instant::now();
        let mut ticks = 0;
        while let Some(f) = x.body.frame().await {
            let f = f.unwrap();
            match f.into_data() {
                Ok(_) => ticks += 1,
                Err(t) => assert_eq!(t.trailers_ref().unwrap()["grpc-status"], "0"),
            }
        }
        assert_eq!(ticks, 20);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(ended(&x.metrics), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_keeps_a_silent_answer_alive_until_it_stops() {
        // Client streaming: the server sent its head and waits for the whole upload.
        let mut x = exchange("application/grpc", Some(AFTER)).await;
        let upload = x.upload;
        tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                upload.send(data("chunk")).await.unwrap();
            }
            // Then the client goes quiet too, without ending its upload.
            std::future::pending::<()>().await;
        });
        let started = Instant::now();
        let f = x.body.frame().await.unwrap().unwrap();
        let t = f.into_trailers().unwrap();
        assert_eq!(t["grpc-status"], "4");
        // Cut 500 ms after the last chunk (at 2 s), not 500 ms after the head.
        assert_eq!(started.elapsed(), Duration::from_millis(2500));
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_timeout_nothing_is_watched() {
        let mut x = exchange("application/grpc", None).await;
        assert!(x.body.watchdog.is_none());
        drop(x.upload);
        x.answer.send(data("first")).await.unwrap();
        assert!(x.body.frame().await.unwrap().is_ok());
        let waited = tokio::time::timeout(Duration::from_secs(3600), x.body.frame()).await;
        assert!(waited.is_err(), "a quiet body without a policy stays open");
    }

    #[test]
    fn durations_are_written_as_operators_write_them() {
        let ms = Duration::from_millis;
        assert_eq!(written(ms(500)), "500ms");
        assert_eq!(written(ms(1500)), "1500ms");
        assert_eq!(written(ms(30_000)), "30s");
        assert_eq!(written(ms(600_000)), "10m");
        assert_eq!(written(ms(3_600_000)), "60m");
    }
}
