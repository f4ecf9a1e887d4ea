//! Panics on the request path: caught, counted, logged, never silent.
//!
//! A panic in one request's code must not take the other connections of the sidecar with it
//! (with `panic = "abort"` one request of death would restart the pod and cut every stream),
//! and it must not pass unnoticed either: each one is logged at error level, counted in
//! `remora_panics_total`, and visible to tests through [`caught`].

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};

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
pub(crate) async fn catch<F: Future>(what: &'static str, fut: F) -> Option<F::Output> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(out) => Some(out),
        Err(payload) => {
            CAUGHT.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                what,
                panic = message(&*payload),
                "BUG: panic caught on the request path; please report it"
            );
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
