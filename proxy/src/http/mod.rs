//! HTTP plumbing shared by inbound and outbound: the response body type, the proxy's own
//! responses (errors in the caller's protocol), and serving a detected connection with hyper.

pub(crate) mod forward;
pub(crate) mod observe;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::drain::Drain;
use crate::io::ServerIo;
pub(crate) use crate::respond::{is_grpc, local_response};

/// HTTP/2 flow-control window per stream, both ways: 256 KiB moves 256 MB/s at 1 ms RTT.
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// Largest request head (request line + headers) accepted over HTTP/1.1 and HTTP/2.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A tower service whose `poll_ready` always returns `Ready` (the proxy's [`Stack`]: no layer
/// applies back-pressure through readiness), so it may be called without being polled first.
///
/// [`Stack`]: crate::listener::Stack
pub(crate) trait AlwaysReady<R>: tower::Service<R> {
    /// The answer to a request whose `call` panicked (a bug): a plain 500, since the request,
    /// moved into the call, is gone (whether it was gRPC is not known: gRPC clients read an
    /// HTTP 500 without grpc-status as UNKNOWN).
    fn panicked() -> Self::Response;
}

impl AlwaysReady<Request<hyper::body::Incoming>> for crate::listener::Stack {
    fn panicked() -> Response<observe::ObservedBody> {
        observe::ObservedBody::local(local_response(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            false,
            "remora: internal error (a bug, logged as a caught panic)",
        ))
    }
}

/// hyper's `Service` over an [`AlwaysReady`] tower service, called as soon as hyper has a
/// request: hyper keeps the call's future per stream, nothing else. hyper-util's
/// `TowerToHyperService` keeps a clone of the service and the request until its first poll,
/// and hyper sizes every stream's task for that (464 bytes against 144 for our future).
///
/// The call's synchronous part runs here, on hyper's connection task (hyper-util ran it on the
/// stream's own task): a panic in it is caught, so that it costs the one request a 500, as a
/// panic in the request's future does, and not every stream of the connection.
#[derive(Clone)]
struct Called<S>(S);

impl<S, R> hyper::service::Service<R> for Called<S>
where
    S: AlwaysReady<R> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CalledFuture<S::Future, S::Response>;

    fn call(&self, req: R) -> Self::Future {
        // A clone per request, as `TowerToHyperService` makes: tower's `call` takes `&mut`.
        match crate::panics::catch_own("request", || self.0.clone().call(req)) {
            Some(fut) => CalledFuture::Called { fut },
            None => CalledFuture::Panicked { make: S::panicked },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Called`]: the service's, or the answer to a call that panicked.
    #[project = CalledProj]
    enum CalledFuture<F, T> {
        Called { #[pin] fut: F },
        Panicked { make: fn() -> T },
    }
}

impl<F, T, E> std::future::Future for CalledFuture<F, T>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            CalledProj::Called { fut } => fut.poll(cx),
            // Made when polled (a function pointer keeps the variant small).
            CalledProj::Panicked { make } => std::task::Poll::Ready(Ok(make())),
        }
    }
}

/// Serves one HTTP/1.1 connection until it ends, or until the drain asks it to finish.
///
/// Not an `async fn`: an `async fn` keeps its arguments in its state for as long as it runs,
/// here next to the connection they were moved into (the socket and the service, 344 bytes
/// per connection). The connection is built first, and the future ([`Serving`]) holds only it
/// and the drain's signal.
pub fn serve_h1<S, B>(
    io: ServerIo,
    svc: S,
    drain: &Drain,
    header_timeout: Duration,
) -> impl Future<Output = ()> + Send + use<S, B>
where
    S: AlwaysReady<Request<hyper::body::Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), Called(svc))
        .with_upgrades();
    Serving {
        conn,
        drained: drain.signaled(),
        finish: |conn| conn.graceful_shutdown(),
        finishing: false,
        protocol: "HTTP/1.1",
    }
}

/// Serves one HTTP/2 connection; on drain it sends a graceful GOAWAY and lets streams finish.
///
/// Not an `async fn`, for the reason [`serve_h1`] gives.
pub fn serve_h2<S, B, I>(
    io: I,
    svc: S,
    drain: &Drain,
) -> impl Future<Output = ()> + Send + use<S, B, I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    S: AlwaysReady<Request<hyper::body::Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        // What one client may make the proxy buffer (the app reads slowly): a stream window
        // per stream and 1 MiB per connection, so memory is bounded by the connection limit.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(4 * STREAM_WINDOW)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), Called(svc));
    Serving {
        conn,
        drained: drain.signaled(),
        finish: |conn| conn.graceful_shutdown(),
        finishing: false,
        protocol: "HTTP/2",
    }
}

pin_project_lite::pin_project! {
    /// Serves a connection until it ends; once the drain signals, asks it to finish (hyper's
    /// graceful shutdown: HTTP/2's GOAWAY, HTTP/1.1's last response) and serves it until it
    /// does. A future type rather than an `async` block around `select!`: the block would hold
    /// the connection twice (captured, and pinned again inside it), and this future lives for
    /// the connection's whole life.
    struct Serving<C> {
        #[pin]
        conn: C,
        #[pin]
        drained: crate::drain::Gated<tokio_util::sync::WaitForCancellationFutureOwned>,
        finish: fn(Pin<&mut C>),
        finishing: bool,
        protocol: &'static str,
    }
}

impl<C: Future<Output = hyper::Result<()>>> Future for Serving<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            // The connection first: the drain is rare.
            if let Poll::Ready(res) = this.conn.as_mut().poll(cx) {
                if let Err(e) = res {
                    let protocol = *this.protocol;
                    tracing::debug!(error = %e, "{protocol} connection ended with an error");
                }
                return Poll::Ready(());
            }
            // Once resolved, the drain is not polled again.
            if *this.finishing || this.drained.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *this.finishing = true;
            (this.finish)(this.conn.as_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    /// A fake stack: answers 200, and panics in the synchronous part of `call` (where the real
    /// stack checks probes and rate limits) for the path `/panic`.
    #[derive(Clone)]
    struct PanicsOnCall;

    impl tower::Service<Request<hyper::body::Incoming>> for PanicsOnCall {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<hyper::body::Incoming>) -> Self::Future {
            if req.uri().path() == "/panic" {
                panic!("injected: a bug in the stack's synchronous part");
            }
            std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
        }
    }

    impl AlwaysReady<Request<hyper::body::Incoming>> for PanicsOnCall {
        fn panicked() -> Response<Full<Bytes>> {
            local_response(http::StatusCode::INTERNAL_SERVER_ERROR, false, "panicked")
        }
    }

    /// The wrapper costs the stream's task nothing beyond the stack's future.
    #[test]
    fn the_called_future_is_no_larger_than_the_stack_future() {
        type Fut =
            <crate::listener::Stack as tower::Service<Request<hyper::body::Incoming>>>::Future;
        type Rsp =
            <crate::listener::Stack as tower::Service<Request<hyper::body::Incoming>>>::Response;
        assert_eq!(
            std::mem::size_of::<CalledFuture<Fut, Rsp>>(),
            std::mem::size_of::<Fut>()
        );
    }

    /// A panic while the stack is called (on hyper's connection task) costs that request a
    /// 500; the connection and its other streams go on, and the panic is counted.
    #[tokio::test]
    async fn a_panic_in_the_call_answers_500_and_the_connection_goes_on() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let drain = Drain::new();
        let server = tokio::spawn(async move { serve_h2(ours, PanicsOnCall, &drain).await });
        let (mut client, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(theirs))
                .await
                .expect("an HTTP/2 handshake over an in-memory pipe");
        tokio::spawn(conn);
        let get = |path: &str| {
            Request::get(format!("http://test{path}"))
                .body(Empty::<Bytes>::new())
                .expect("a valid request")
        };

        let before = crate::panics::caught();
        // One stream in flight across the panic, on the same connection.
        client.ready().await.expect("ready");
        let across = client.send_request(get("/before"));
        client.ready().await.expect("ready");
        let rsp = client.send_request(get("/panic")).await.expect("an answer");
        assert_eq!(rsp.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            crate::panics::caught() > before,
            "the panic was not counted"
        );
        let rsp = across.await.expect("the other stream survived");
        assert_eq!(rsp.status(), http::StatusCode::OK);
        client.ready().await.expect("the connection is still open");
        let rsp = client.send_request(get("/after")).await.expect("an answer");
        assert_eq!(rsp.status(), http::StatusCode::OK);
        let body = rsp.into_body().collect().await.expect("a body").to_bytes();
        assert_eq!(&body[..], b"ok");
        assert!(!server.is_finished());
    }
}
