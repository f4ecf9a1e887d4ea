//! HTTP2 Ping usage.
//!
//! hyper uses HTTP2 pings for two purposes:
//!
//! 1. Adaptive flow control using BDP
//! 2. Connection keep-alive
//!
//! Both cases are optional.
//!
//! # BDP Algorithm
//!
//! 1. When receiving a DATA frame, if a BDP ping isn't outstanding:
//!    1a. Record current time.
//!    1b. Send a BDP ping.
//! 2. Increment the number of received bytes.
//! 3. When the BDP ping ack is received:
//!    3a. Record duration from sent time.
//!    3b. Merge RTT with a running average.
//!    3c. Calculate bdp as bytes/rtt.
//!    3d. If bdp is over 2/3 max, set new max to bdp and update windows.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{self, Poll, Waker};
use std::time::{Duration, Instant};

use h2::{Ping, PingPong};

use crate::common::lock::LockResultExt;
use crate::common::time::Time;
use crate::rt::Sleep;

type WindowSize = u32;

pub(super) fn disabled() -> Recorder {
    Recorder { shared: None }
}

pub(super) fn channel(ping_pong: PingPong, config: Config, timer: Time) -> (Recorder, Ponger) {
    debug_assert!(
        config.is_enabled(),
        "ping channel requires bdp or keep-alive config",
    );

    let bdp = config.bdp_initial_window.map(|wnd| Bdp {
        bdp: wnd,
        max_bandwidth: 0.0,
        rtt: 0.0,
        ping_delay: Duration::from_millis(100),
        stable_count: 0,
    });

    let now = timer.now();

    let (bytes, next_bdp_at) = if bdp.is_some() {
        (Some(0), Some(now))
    } else {
        (None, None)
    };

    let keep_alive = config.keep_alive_interval.map(|interval| KeepAlive {
        interval,
        timeout: config.keep_alive_timeout,
        while_idle: config.keep_alive_while_idle,
        sleep: GatedSleep::new(timer.sleep(interval)),
        state: KeepAliveState::Init,
        timer: timer.clone(),
    });

    let last_read_at = keep_alive.as_ref().map(|_| now);

    let shared = Arc::new(Mutex::new(Shared {
        bytes,
        last_read_at,
        is_keep_alive_timed_out: false,
        ping_pong,
        ping_sent_at: None,
        next_bdp_at,
        timer,
    }));

    (
        Recorder {
            shared: Some(shared.clone()),
        },
        Ponger {
            bdp,
            keep_alive,
            shared,
        },
    )
}

#[derive(Clone)]
pub(super) struct Config {
    pub(super) bdp_initial_window: Option<WindowSize>,
    /// If no frames are received in this amount of time, a PING frame is sent.
    pub(super) keep_alive_interval: Option<Duration>,
    /// After sending a keepalive PING, the connection will be closed if
    /// a pong is not received in this amount of time.
    pub(super) keep_alive_timeout: Duration,
    /// If true, sends pings even when there are no active streams.
    pub(super) keep_alive_while_idle: bool,
}

#[derive(Clone)]
pub(crate) struct Recorder {
    shared: Option<Arc<Mutex<Shared>>>,
}

pub(super) struct Ponger {
    bdp: Option<Bdp>,
    keep_alive: Option<KeepAlive>,
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    ping_pong: PingPong,
    ping_sent_at: Option<Instant>,

    // bdp
    /// If `Some`, bdp is enabled, and this tracks how many bytes have been
    /// read during the current sample.
    bytes: Option<usize>,
    /// We delay a variable amount of time between BDP pings. This allows us
    /// to send less pings as the bandwidth stabilizes.
    next_bdp_at: Option<Instant>,

    // keep-alive
    /// If `Some`, keep-alive is enabled, and the Instant is how long ago
    /// the connection read the last frame.
    last_read_at: Option<Instant>,

    is_keep_alive_timed_out: bool,
    timer: Time,
}

struct Bdp {
    /// Current BDP in bytes.
    bdp: u32,
    /// Largest bandwidth we've seen so far.
    max_bandwidth: f64,
    /// Round trip time in seconds.
    rtt: f64,
    /// Delay the next ping by this amount.
    ///
    /// This will change depending on how stable the current bandwidth is.
    ping_delay: Duration,
    /// The count of ping round trips where BDP has stayed the same.
    stable_count: u32,
}

struct KeepAlive {
    /// If no frames are received in this amount of time, a PING frame is sent.
    interval: Duration,
    /// After sending a keepalive PING, the connection will be closed if
    /// a pong is not received in this amount of time.
    timeout: Duration,
    /// If true, sends pings even when there are no active streams.
    while_idle: bool,
    state: KeepAliveState,
    sleep: GatedSleep,
    timer: Time,
}

/// The keep-alive timer, polled through a waker of its own.
///
/// The connection polls its `Ponger` at every wake-up (each frame read or written), and
/// polling the timer each time cost more than the rest of the keep-alive bookkeeping (a tokio
/// `Sleep` checks the runtime's coop budget, the waker and its timer entry). Between the
/// timer's own wake-ups, a poll from the task that polled last is one flag read.
struct GatedSleep {
    sleep: Pin<Box<dyn Sleep>>,
    gate: Arc<SleepGate>,
    /// The waker the timer is polled with: `gate`'s.
    gate_waker: Waker,
    /// The task waker `gate` passes wake-ups on to, as last registered there.
    task: Option<Waker>,
    /// The timer has been polled (and answered `Pending`) since it was last set.
    armed: bool,
}

struct SleepGate {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl std::task::Wake for SleepGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        // Woken outside the lock: a waker may run code of its own.
        let task = self.task.lock().panic_if_poisoned().clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl GatedSleep {
    fn new(sleep: Pin<Box<dyn Sleep>>) -> Self {
        let gate = Arc::new(SleepGate {
            fired: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        GatedSleep {
            sleep,
            gate_waker: Waker::from(gate.clone()),
            gate,
            task: None,
            armed: false,
        }
    }

    /// Whether a poll from this task now would answer `Pending` without reaching the timer.
    fn is_quiet(&self, cx: &task::Context<'_>) -> bool {
        self.armed
            && self
                .task
                .as_ref()
                .is_some_and(|task| task.will_wake(cx.waker()))
            && !self.gate.fired.load(Ordering::Acquire)
    }

    fn poll(&mut self, cx: &mut task::Context<'_>) -> Poll<()> {
        let same_task = self
            .task
            .as_ref()
            .is_some_and(|task| task.will_wake(cx.waker()));
        if same_task && self.armed && !self.gate.fired.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !same_task {
            let old = {
                let mut task = self.gate.task.lock().panic_if_poisoned();
                std::mem::replace(&mut *task, Some(cx.waker().clone()))
            };
            // Dropped outside the lock, like a wake-up.
            drop(old);
            self.task = Some(cx.waker().clone());
        }
        // Cleared before the timer is looked at: a wake-up from now on sets it again. The
        // swap (a read-modify-write, acquiring) also makes a fire that set it before visible
        // to the poll below, which then answers `Ready`.
        self.gate.fired.swap(false, Ordering::AcqRel);
        let mut gated = task::Context::from_waker(&self.gate_waker);
        let res = self.sleep.as_mut().poll(&mut gated);
        self.armed = res.is_pending();
        res
    }

    fn reset(&mut self, timer: &Time, deadline: Instant) {
        timer.reset(&mut self.sleep, deadline);
        self.armed = false;
    }
}

enum KeepAliveState {
    Init,
    Scheduled(Instant),
    PingSent,
}

pub(super) enum Ponged {
    SizeUpdate(WindowSize),
    KeepAliveTimedOut,
}

#[derive(Debug)]
pub(super) struct KeepAliveTimedOut;

// ===== impl Config =====

impl Config {
    pub(super) fn is_enabled(&self) -> bool {
        self.bdp_initial_window.is_some() || self.keep_alive_interval.is_some()
    }
}

// ===== impl Recorder =====

/// A [`Recorder`] that does not count as a user of the connection (see `Ponger::is_idle`).
#[derive(Clone)]
pub(crate) struct WeakRecorder {
    shared: Option<std::sync::Weak<Mutex<Shared>>>,
}

impl WeakRecorder {
    /// A recorder for one request: disabled if the connection is gone.
    pub(crate) fn upgrade(&self) -> Recorder {
        Recorder {
            shared: self.shared.as_ref().and_then(|weak| weak.upgrade()),
        }
    }
}

impl Recorder {
    pub(crate) fn downgrade(&self) -> WeakRecorder {
        WeakRecorder {
            shared: self.shared.as_ref().map(Arc::downgrade),
        }
    }

    pub(crate) fn record_data(&self, len: usize) {
        let shared = if let Some(shared) = &self.shared {
            shared
        } else {
            return;
        };

        let mut locked = shared.lock().panic_if_poisoned();

        locked.update_last_read_at();

        // are we ready to send another bdp ping?
        // if not, we don't need to record bytes either

        if let Some(next_bdp_at) = &locked.next_bdp_at {
            if locked.timer.now() < *next_bdp_at {
                return;
            } else {
                locked.next_bdp_at = None;
            }
        }

        if let Some(bytes) = &mut locked.bytes {
            *bytes += len;
        } else {
            // no need to send bdp ping if bdp is disabled
            return;
        }

        if !locked.is_ping_sent() {
            locked.send_ping();
        }
    }

    pub(crate) fn record_non_data(&self) {
        let shared = if let Some(shared) = &self.shared {
            shared
        } else {
            return;
        };

        let mut locked = shared.lock().panic_if_poisoned();

        locked.update_last_read_at();
    }

    /// If the incoming stream is already closed, convert self into
    /// a disabled reporter.
    #[cfg(feature = "client")]
    pub(super) fn for_stream(self, stream: &h2::RecvStream) -> Self {
        if stream.is_end_stream() {
            disabled()
        } else {
            self
        }
    }

    pub(super) fn ensure_not_timed_out(&self) -> crate::Result<()> {
        if let Some(shared) = &self.shared {
            let locked = shared.lock().panic_if_poisoned();
            if locked.is_keep_alive_timed_out {
                return Err(KeepAliveTimedOut.crate_error());
            }
        }

        // else
        Ok(())
    }
}

// ===== impl Ponger =====

impl Ponger {
    pub(super) fn poll(&mut self, cx: &mut task::Context<'_>) -> Poll<Ponged> {
        // Without BDP, a ping is out only in `PingSent`; while the keep-alive timer is set and
        // has not fired, there is nothing to do, and this runs at every wake-up of the
        // connection: no lock then.
        if self.bdp.is_none() {
            if let Some(ka) = &self.keep_alive {
                if matches!(ka.state, KeepAliveState::Scheduled(_)) && ka.sleep.is_quiet(cx) {
                    return Poll::Pending;
                }
            }
        }
        let mut locked = self.shared.lock().panic_if_poisoned();
        let is_idle = self.is_idle();

        if let Some(ka) = &mut self.keep_alive {
            ka.maybe_schedule(is_idle, &locked);
            ka.maybe_ping(cx, is_idle, &mut locked);
        }

        if !locked.is_ping_sent() {
            // XXX: this doesn't register a waker...?
            return Poll::Pending;
        }

        match locked.ping_pong.poll_pong(cx) {
            Poll::Ready(Ok(_pong)) => {
                // Read the clock only here, on a pong: this runs on every poll of the
                // connection, and most polls see no pong.
                let now = locked.timer.now();
                let start = locked
                    .ping_sent_at
                    .expect("pong received implies ping_sent_at");
                locked.ping_sent_at = None;
                let rtt = now - start;
                trace!("recv pong");

                if let Some(ka) = &mut self.keep_alive {
                    locked.update_last_read_at();
                    ka.maybe_schedule(is_idle, &locked);
                    ka.maybe_ping(cx, is_idle, &mut locked);
                }

                if let Some(bdp) = &mut self.bdp {
                    let bytes = locked.bytes.expect("bdp enabled implies bytes");
                    locked.bytes = Some(0); // reset
                    trace!("received BDP ack; bytes = {}, rtt = {:?}", bytes, rtt);

                    let update = bdp.calculate(bytes, rtt);
                    locked.next_bdp_at = Some(now + bdp.ping_delay);
                    if let Some(update) = update {
                        return Poll::Ready(Ponged::SizeUpdate(update));
                    }
                }
            }
            Poll::Ready(Err(_e)) => {
                debug!("pong error: {}", _e);
            }
            Poll::Pending => {
                if let Some(ka) = &mut self.keep_alive {
                    if let Err(KeepAliveTimedOut) = ka.maybe_timeout(cx) {
                        self.keep_alive = None;
                        locked.is_keep_alive_timed_out = true;
                        return Poll::Ready(Ponged::KeepAliveTimedOut);
                    }
                }
            }
        }

        // XXX: this doesn't register a waker...?
        Poll::Pending
    }

    fn is_idle(&self) -> bool {
        Arc::strong_count(&self.shared) <= 2
    }
}

// ===== impl Shared =====

impl Shared {
    fn send_ping(&mut self) {
        match self.ping_pong.send_ping(Ping::opaque()) {
            Ok(()) => {
                self.ping_sent_at = Some(self.timer.now());
                trace!("sent ping");
            }
            Err(_err) => {
                debug!("error sending ping: {}", _err);
            }
        }
    }

    fn is_ping_sent(&self) -> bool {
        self.ping_sent_at.is_some()
    }

    fn update_last_read_at(&mut self) {
        if self.last_read_at.is_some() {
            self.last_read_at = Some(self.timer.now());
        }
    }

    fn last_read_at(&self) -> Instant {
        self.last_read_at.expect("keep_alive expects last_read_at")
    }
}

// ===== impl Bdp =====

/// Any higher than this likely will be hitting the TCP flow control.
const BDP_LIMIT: WindowSize = 1024 * 1024 * 16;

impl Bdp {
    fn calculate(&mut self, bytes: usize, rtt: Duration) -> Option<WindowSize> {
        // No need to do any math if we're at the limit.
        if self.bdp == BDP_LIMIT {
            self.stabilize_delay();
            return None;
        }

        // average the rtt
        let rtt = seconds(rtt);
        if self.rtt == 0.0 {
            // First sample means rtt is first rtt.
            self.rtt = rtt;
        } else {
            // Weigh this rtt as 1/8 for a moving average.
            self.rtt += (rtt - self.rtt) * 0.125;
        }

        // calculate the current bandwidth
        let bw = (bytes as f64) / (self.rtt * 1.5);
        trace!("current bandwidth = {:.1}B/s", bw);

        if bw < self.max_bandwidth {
            // not a faster bandwidth, so don't update
            self.stabilize_delay();
            return None;
        } else {
            self.max_bandwidth = bw;
        }

        // if the current `bytes` sample is at least 2/3 the previous
        // bdp, increase to double the current sample.
        #[allow(clippy::integer_division_remainder_used)]
        #[allow(clippy::integer_division)]
        if bytes >= self.bdp as usize * 2 / 3 {
            self.bdp =
                WindowSize::try_from((bytes * 2).min(BDP_LIMIT as usize)).unwrap_or(BDP_LIMIT);
            trace!("BDP increased to {}", self.bdp);

            self.stable_count = 0;
            self.ping_delay /= 2;
            Some(self.bdp)
        } else {
            self.stabilize_delay();
            None
        }
    }

    fn stabilize_delay(&mut self) {
        if self.ping_delay < Duration::from_secs(10) {
            self.stable_count += 1;

            if self.stable_count >= 2 {
                self.ping_delay *= 4;
                self.stable_count = 0;
            }
        }
    }
}

fn seconds(dur: Duration) -> f64 {
    const NANOS_PER_SEC: f64 = 1_000_000_000.0;
    let secs = dur.as_secs() as f64;
    secs + (f64::from(dur.subsec_nanos())) / NANOS_PER_SEC
}

// ===== impl KeepAlive =====

impl KeepAlive {
    fn maybe_schedule(&mut self, is_idle: bool, shared: &Shared) {
        match self.state {
            KeepAliveState::Init => {
                if !self.while_idle && is_idle {
                    return;
                }

                self.schedule(shared);
            }
            KeepAliveState::PingSent => {
                if shared.is_ping_sent() {
                    return;
                }
                self.schedule(shared);
            }
            KeepAliveState::Scheduled(..) => (),
        }
    }

    fn schedule(&mut self, shared: &Shared) {
        let interval = shared.last_read_at() + self.interval;
        self.state = KeepAliveState::Scheduled(interval);
        self.sleep.reset(&self.timer, interval);
    }

    fn maybe_ping(&mut self, cx: &mut task::Context<'_>, is_idle: bool, shared: &mut Shared) {
        match self.state {
            KeepAliveState::Scheduled(at) => {
                if self.sleep.poll(cx).is_pending() {
                    return;
                }
                // check if we've received a frame while we were scheduled
                if shared.last_read_at() + self.interval > at {
                    self.state = KeepAliveState::Init;
                    cx.waker().wake_by_ref(); // schedule us again
                    return;
                }
                if !self.while_idle && is_idle {
                    trace!("keep-alive no need to ping when idle and while_idle=false");
                    return;
                }
                trace!("keep-alive interval ({:?}) reached", self.interval);
                shared.send_ping();
                self.state = KeepAliveState::PingSent;
                let timeout = self.timer.now() + self.timeout;
                self.sleep.reset(&self.timer, timeout);
            }
            KeepAliveState::Init | KeepAliveState::PingSent => (),
        }
    }

    fn maybe_timeout(&mut self, cx: &mut task::Context<'_>) -> Result<(), KeepAliveTimedOut> {
        match self.state {
            KeepAliveState::PingSent => {
                if self.sleep.poll(cx).is_pending() {
                    return Ok(());
                }
                trace!("keep-alive timeout ({:?}) reached", self.timeout);
                Err(KeepAliveTimedOut)
            }
            KeepAliveState::Init | KeepAliveState::Scheduled(..) => Ok(()),
        }
    }
}

// ===== impl KeepAliveTimedOut =====

impl KeepAliveTimedOut {
    pub(super) fn crate_error(self) -> crate::Error {
        crate::Error::new(crate::error::Kind::Http2).with(self)
    }
}

impl fmt::Display for KeepAliveTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("keep-alive timed out")
    }
}

impl std::error::Error for KeepAliveTimedOut {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&crate::error::TimedOut)
    }
}

#[cfg(test)]
mod gated_sleep_tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;

    /// A timer that fires when told to, counting its polls.
    #[derive(Clone, Default)]
    struct Fake {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Fake {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl Sleep for Fake {}

    impl Fake {
        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }
        fn fire(&self) {
            self.ready.store(true, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    /// `reset` sets the same fake again, unfired.
    struct FakeTimer(Fake);

    impl crate::rt::Timer for FakeTimer {
        fn sleep(&self, _: Duration) -> Pin<Box<dyn Sleep>> {
            Box::pin(self.0.clone())
        }
        fn sleep_until(&self, _: Instant) -> Pin<Box<dyn Sleep>> {
            self.0.ready.store(false, Ordering::SeqCst);
            Box::pin(self.0.clone())
        }
    }

    /// A task's waker, counting its wake-ups.
    struct Task(AtomicUsize);

    impl std::task::Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Task>, Waker) {
        let t = Arc::new(Task(AtomicUsize::new(0)));
        (t.clone(), Waker::from(t))
    }

    #[test]
    fn the_timer_is_polled_again_only_after_its_own_wake_up() {
        let fake = Fake::default();
        let mut gated = GatedSleep::new(Box::pin(fake.clone()));
        let (t, waker) = task();
        let mut cx = task::Context::from_waker(&waker);
        assert!(gated.poll(&mut cx).is_pending());
        assert_eq!(fake.polls(), 1);
        // The connection's other wake-ups: no poll of the timer.
        for _ in 0..3 {
            assert!(gated.poll(&mut cx).is_pending());
        }
        assert_eq!(fake.polls(), 1);
        // The timer fires: the task is woken, and the next poll reaches the timer.
        fake.fire();
        assert_eq!(t.0.load(Ordering::SeqCst), 1);
        assert!(gated.poll(&mut cx).is_ready());
        assert_eq!(fake.polls(), 2);
    }

    #[test]
    fn a_new_task_or_a_reset_reaches_the_timer() {
        let fake = Fake::default();
        let mut gated = GatedSleep::new(Box::pin(fake.clone()));
        let (first, w1) = task();
        let (second, w2) = task();
        assert!(gated.poll(&mut task::Context::from_waker(&w1)).is_pending());
        // Another task polls: the timer learns of it, and wakes it, not the first.
        assert!(gated.poll(&mut task::Context::from_waker(&w2)).is_pending());
        assert_eq!(fake.polls(), 2);
        fake.fire();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(gated.poll(&mut task::Context::from_waker(&w2)).is_ready());
        // Set again: the next poll reaches the timer, the one after it does not.
        let timer = Time::Timer(Arc::new(FakeTimer(fake.clone())));
        gated.reset(&timer, Instant::now() + Duration::from_secs(30));
        assert!(gated.poll(&mut task::Context::from_waker(&w2)).is_pending());
        assert!(gated.poll(&mut task::Context::from_waker(&w2)).is_pending());
        assert_eq!(fake.polls(), 4);
    }
}
