//! Shutdown signalling shared by every listener and connection.
//!
//! `signaled` fires when draining starts: listeners stop accepting, HTTP connections finish
//! gracefully (GOAWAY / `Connection: close`). `cut` fires at the drain deadline: whatever is
//! still running is dropped. The tracker tells when nothing is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
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
        let hard = self.hard.clone();
        let cut = self.cut.clone();
        self.tracker.spawn(async move {
            let started = tokio::time::Instant::now();
            tokio::select! {
                _ = crate::panics::catch(what, task) => {}
                _ = hard.cancelled() => {
                    cut.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(what, peer = ?peer, age = ?started.elapsed(),
                        "drain deadline reached; cutting it");
                }
            }
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
