//! Shutdown signalling shared by every listener and connection.
//!
//! `signaled` fires when draining starts: listeners stop accepting, HTTP connections finish
//! gracefully (GOAWAY / `Connection: close`). `cut` fires at the drain deadline: whatever is
//! still running is dropped. The tracker tells when nothing is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::pin::Pin;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

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

    /// Resolves once draining has started. Cheap to poll again before then (see [`Gated`]):
    /// a connection polls it every time it is woken.
    pub fn signaled(&self) -> Gated<WaitForCancellationFutureOwned> {
        Gated::new(self.graceful.clone().cancelled_owned())
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
            hard: Gated::new(self.hard.clone().cancelled_owned()),
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
        hard: Gated<WaitForCancellationFutureOwned>,
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

pin_project_lite::pin_project! {
    /// A future polled only after it woke its task, instead of every time the task is polled.
    ///
    /// Why: a connection's task waits on the drain signals beside its own work and is woken
    /// by that work a few times per request. A cancellation future, polled, checks its token
    /// and takes `Notify`'s lock to compare wakers: about 160 instructions, twice per wake-up
    /// (graceful and hard), 2 % of an HTTP/1.1 request. Here a poll between its own wake-ups
    /// is an `AtomicWaker` check and a flag.
    ///
    /// How: `inner` is polled with a waker of its own, which sets `fired` and wakes the task
    /// that polled last. The flag is taken before `inner` is polled, so a wake-up during or
    /// after that poll is never lost.
    pub(crate) struct Gated<F> {
        #[pin]
        inner: F,
        // Made at the first poll: a future built and dropped unpolled costs nothing more.
        gate: Option<Arc<Gate>>,
    }
}

struct Gate {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> Gated<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner, gate: None }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let gate = this.gate.get_or_insert_with(|| {
            Arc::new(Gate {
                // The first poll always reaches `inner`, which registers the gate's waker.
                fired: AtomicBool::new(true),
                task: AtomicWaker::new(),
            })
        });
        gate.task.register(cx.waker());
        if !gate.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(gate.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
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
            hard: Gated::new(drain.hard.clone().cancelled_owned()),
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

    /// Counts the wake-ups a task gets.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A future that counts its polls and is ready when `rx` is; `spurious` wakes it once
    /// without making it ready.
    struct Counted {
        polls: Arc<AtomicUsize>,
        rx: tokio::sync::oneshot::Receiver<()>,
        spurious: LastWaker,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.spurious.lock().unwrap() = Some(cx.waker().clone());
            Pin::new(&mut self.rx).poll(cx).map(|_| ())
        }
    }

    /// The waker `Counted` was last polled with.
    type LastWaker = Arc<std::sync::Mutex<Option<Waker>>>;

    /// A gated `Counted`, and its handles.
    struct Rig {
        gated: Pin<Box<Gated<Counted>>>,
        polls: Arc<AtomicUsize>,
        tx: tokio::sync::oneshot::Sender<()>,
        spurious: LastWaker,
    }

    fn counted() -> Rig {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let polls = Arc::new(AtomicUsize::new(0));
        let spurious = Arc::new(std::sync::Mutex::new(None));
        let inner = Counted {
            polls: polls.clone(),
            rx,
            spurious: spurious.clone(),
        };
        Rig {
            gated: Box::pin(Gated::new(inner)),
            polls,
            tx,
            spurious,
        }
    }

    #[test]
    fn gated_polls_its_future_only_after_that_future_woke_the_task() {
        let Rig {
            mut gated,
            polls,
            tx,
            spurious,
        } = counted();
        let task = Arc::new(Task::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "the first poll reaches it");
        // The task is woken by other work: the inner future is not polled.
        for _ in 0..10 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // A wake-up of its own without being ready: the task is woken, the future polled
        // once more, and it stays armed.
        let w = spurious.lock().unwrap().take().unwrap();
        w.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        // Ready: the task is woken and the next poll finishes.
        tx.send(()).unwrap();
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn gated_wakes_the_task_that_polled_last() {
        let Rig { mut gated, tx, .. } = counted();
        let (first, second) = (Arc::new(Task::default()), Arc::new(Task::default()));
        let w1 = Waker::from(first.clone());
        assert!(
            gated
                .as_mut()
                .poll(&mut Context::from_waker(&w1))
                .is_pending()
        );
        // Moved to another task (a `select!` polled from elsewhere).
        let w2 = Waker::from(second.clone());
        assert!(
            gated
                .as_mut()
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        tx.send(()).unwrap();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(
            gated
                .as_mut()
                .poll(&mut Context::from_waker(&w2))
                .is_ready()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn signaled_resolves_for_connections_waiting_before_and_after_the_start() {
        let drain = Drain::new();
        let before = tokio::spawn({
            let drain = drain.clone();
            async move { drain.signaled().await }
        });
        tokio::task::yield_now().await;
        assert!(!before.is_finished());
        drain.start();
        tokio::time::timeout(Duration::from_secs(1), before)
            .await
            .expect("woken by the start")
            .expect("task");
        // A future made after the start resolves at its first poll.
        tokio::time::timeout(Duration::from_secs(1), drain.signaled())
            .await
            .expect("already signaled");
    }
}
