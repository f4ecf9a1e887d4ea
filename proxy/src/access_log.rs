//! The access log (`REMORA_ACCESS_LOG`, off by default): one JSON line per request on standard
//! output, with tap's fields ([`crate::tap::Event`]) — never a header value outside tap's
//! allow-list, never a body or a query string. The proxy's own log stays on standard error.
//!
//! Lines go through a bounded queue to one writer thread, so a slow consumer of standard
//! output never blocks a request: when the queue is full, lines are dropped and counted in
//! `remora_access_log_dropped_total`.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError};

use prometheus_client::metrics::counter::Counter;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 4096;

/// Which requests get a line: a fraction in (0, 1], drawn per request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AccessLog {
    sample: f64,
}

impl AccessLog {
    pub(crate) fn new(sample: f64) -> Option<Self> {
        (sample > 0.0).then_some(AccessLog {
            sample: sample.min(1.0),
        })
    }

    /// Whether this request is logged.
    pub(crate) fn sampled(self) -> bool {
        self.sample >= 1.0 || crate::random::unit_f64() < self.sample
    }
}

struct Writer {
    tx: SyncSender<String>,
    dropped: Counter,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

/// Lines dropped because standard output fell behind (registered as a metric).
pub(crate) fn dropped() -> Counter {
    writer().dropped.clone()
}

fn writer() -> &'static Writer {
    WRITER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("remora-access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Ok(line) = rx.recv() {
                    let mut out = stdout.lock();
                    let mut ok = out.write_all(line.as_bytes()).is_ok();
                    // Whatever else is queued goes out in the same write burst.
                    while ok && let Ok(more) = rx.try_recv() {
                        ok = out.write_all(more.as_bytes()).is_ok();
                    }
                    if !ok || out.flush().is_err() {
                        // Standard output is gone (closed pipe): stop logging, keep serving.
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the access log writer; access log lines will be dropped");
        }
        Writer {
            tx,
            dropped: Counter::default(),
        }
    })
}

/// Queues one line (ending in `\n`).
pub(crate) fn write(line: String) {
    let w = writer();
    match w.tx.try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            w.dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling() {
        assert_eq!(AccessLog::new(0.0), None);
        assert_eq!(AccessLog::new(-1.0), None);
        assert!(AccessLog::new(1.0).unwrap().sampled());
        assert!(AccessLog::new(7.0).unwrap().sampled());
        let tenth = AccessLog::new(0.1).unwrap();
        let n = (0..10_000).filter(|_| tenth.sampled()).count();
        assert!((700..1300).contains(&n), "{n} of 10000 at 0.1");
    }
}
