//! Shutdown signalling shared by every listener and connection.
//!
//! `signaled` fires when draining starts: listeners stop accepting, HTTP connections finish
//! gracefully (GOAWAY / `Connection: close`). `cut` fires at the drain deadline: whatever is
//! still running is dropped. The tracker tells when nothing is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Drain {
    graceful: CancellationToken,
    hard: CancellationToken,
    tracker: TaskTracker,
    cut: Arc<AtomicUsize>,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        self.graceful.cancelled().await
    }

    /// Runs a connection's task; it is dropped, logged and counted as cut if still running at
    /// the drain deadline. `what` and `peer` only name it in that log line.
    pub fn spawn<F>(&self, what: &'static str, peer: Option<SocketAddr>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // A future type rather than an async block around `select!`: the block would hold
        // `task` twice (captured, and again inside the select), and this future lives for
        // the connection's whole life.
        self.tracker.spawn(Guarded {
            task: crate::panics::catch(what, task),
            hard: self.hard.clone().cancelled_owned(),
            cut: self.cut.clone(),
            started: tokio::time::Instant::now(),
            what,
            peer,
        });
    }

    pub fn start(&self) {
        self.graceful.cancel();
        self.tracker.close();
    }

    /// Number of tasks still running.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Waits for every task, up to `deadline`; then cuts the rest and returns how many were cut.
    pub async fn finish(&self, deadline: tokio::time::Instant) -> usize {
        self.start();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            self.hard.cancel();
            self.tracker.wait().await;
        }
        self.cut.load(Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    /// A connection's task, cut (and logged, and counted) at the drain deadline.
    struct Guarded<F> {
        #[pin]
        task: crate::panics::Catch<F>,
        #[pin]
        hard: WaitForCancellationFutureOwned,
        cut: Arc<AtomicUsize>,
        started: tokio::time::Instant,
        what: &'static str,
        peer: Option<SocketAddr>,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.task.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        std::task::ready!(this.hard.poll(cx));
        this.cut.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(what = *this.what, peer = ?this.peer, age = ?this.started.elapsed(),
            "drain deadline reached; cutting it");
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn finished_tasks_are_not_cut_and_stuck_ones_are_at_the_deadline() {
        let drain = Drain::new();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        drain.spawn("quick", None, async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = done_tx.send(());
        });
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        drain.spawn("stuck", None, async move {
            let _held = dropped_tx;
            std::future::pending::<()>().await;
        });
        assert_eq!(drain.in_flight(), 2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        assert_eq!(drain.finish(deadline).await, 1);
        assert!(done_rx.await.is_ok(), "the quick task ran to its end");
        assert!(dropped_rx.await.is_err(), "the stuck task was dropped");
        assert_eq!(drain.in_flight(), 0);
        assert!(tokio::time::Instant::now() >= deadline);
    }

    /// The wrapper lives as long as each connection: it must not hold the task twice.
    #[test]
    fn the_wrapper_holds_the_task_once() {
        let task = async {
            let buf = [1u8; 2048];
            tokio::task::yield_now().await;
            std::hint::black_box(buf);
        };
        let inner = std::mem::size_of_val(&task);
        let drain = Drain::new();
        let guarded = Guarded {
            task: crate::panics::catch("t", task),
            hard: drain.hard.clone().cancelled_owned(),
            cut: drain.cut.clone(),
            started: tokio::time::Instant::now(),
            what: "t",
            peer: None,
        };
        assert!(
            std::mem::size_of_val(&guarded) < inner + 256,
            "{} bytes around a {inner}-byte task",
            std::mem::size_of_val(&guarded)
        );
    }
}
