//! Panics on the request path: caught, counted, logged, never silent.
//!
//! A panic in one request's code must not take the other connections of the sidecar with it
//! (with `panic = "abort"` one request of death would restart the pod and cut every stream),
//! and it must not pass unnoticed either: each one is logged at error level, counted in
//! `remora_panics_total`, and visible to tests through [`caught`].

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::FutureExt;

static CAUGHT: AtomicU64 = AtomicU64::new(0);

/// Panics caught in this process so far (every proxy in it).
pub fn caught() -> u64 {
    CAUGHT.load(Ordering::Relaxed)
}

fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs `fut`; a panic in it is recorded and becomes `None`.
///
/// A future type, not an `async fn`: an `async fn` keeps its argument and the future it awaits
/// side by side, so wrapping a request's future doubled its size (14.4 KB per request in
/// flight, the largest allocation with 1,000 concurrent streams).
pub(crate) fn catch<F: Future>(what: &'static str, fut: F) -> Catch<F> {
    Catch {
        what,
        inner: AssertUnwindSafe(fut).catch_unwind(),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`catch`].
    pub(crate) struct Catch<F> {
        what: &'static str,
        #[pin]
        inner: futures_util::future::CatchUnwind<AssertUnwindSafe<F>>,
    }
}

impl<F: Future> Future for Catch<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match std::task::ready!(this.inner.poll(cx)) {
            Ok(out) => Some(out),
            Err(payload) => {
                record(this.what, &*payload);
                None
            }
        })
    }
}

fn record(what: &str, payload: &(dyn Any + Send)) {
    CAUGHT.fetch_add(1, Ordering::Relaxed);
    tracing::error!(
        what,
        panic = message(payload),
        "BUG: panic caught on the request path; please report it"
    );
}

/// Runs remora's own synchronous request code; a panic in it is recorded and becomes `None`.
pub(crate) fn catch_own<T>(what: &'static str, code: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(code)) {
        Ok(out) => Some(out),
        Err(payload) => {
            record(what, &*payload);
            None
        }
    }
}

/// Runs an embedding application's hook; a panic in it is logged and becomes `None`. Not
/// counted in [`caught`]: that counts remora's own bugs.
pub(crate) fn catch_sync<T>(hook: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(hook)) {
        Ok(out) => Some(out),
        Err(payload) => {
            tracing::error!(
                panic = message(&*payload),
                "a request hook panicked (a bug in the embedding application); the request got a 500"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request path wraps every request's future in `catch`: the wrapper must cost a few
    /// bytes, not a second copy of the future (an `async fn` wrapper doubled it).
    #[test]
    fn catch_does_not_copy_the_future() {
        let big = async {
            let buf = [7u8; 4096];
            tokio::task::yield_now().await;
            buf.iter().map(|b| *b as u64).sum::<u64>()
        };
        let inner = std::mem::size_of_val(&big);
        let wrapped = catch("test", big);
        assert!(inner >= 4096);
        assert!(
            std::mem::size_of_val(&wrapped) <= inner + 32,
            "catch({inner} bytes) takes {} bytes",
            std::mem::size_of_val(&wrapped)
        );
    }

    #[tokio::test]
    async fn a_panic_becomes_none_and_is_counted() {
        let before = caught();
        let out = catch("test", async {
            tokio::task::yield_now().await;
            if before < u64::MAX {
                panic!("boom");
            }
            1
        })
        .await;
        assert_eq!(out, None);
        assert!(caught() > before);
        assert_eq!(catch("test", async { 5 }).await, Some(5));
    }
}
