//! A discovery source of the application's own: an in-process registry (a `tokio::sync::watch`
//! of endpoints) serves `billing.internal:80`. Backend A takes the traffic first; while a
//! request loop runs, the registry switches the name to backend B, and the loop's requests
//! move to B without a single failure.
//!
//!     cargo run -p remora-proxy --example custom_discovery

#[path = "support/mod.rs"]
mod support;

use http::StatusCode;
use remora_proxy::discover::{Discover, Target, Update, Updates};
use remora_proxy::{EndpointSpec, Listen, Proxy};
use support::BoxError;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The registry as remora sees it: the current endpoints of `billing.internal:80`.
struct Registry(watch::Receiver<Vec<EndpointSpec>>);

impl Discover for Registry {
    fn resolve(&self, target: Target<'_>) -> Option<Updates> {
        if target != Target::Name("billing.internal:80") {
            return None; // not ours: the next source (or DNS) answers
        }
        let mut rx = self.0.clone();
        let (tx, updates) = Updates::channel(1);
        // Called on remora's runtime, once per name it starts following.
        tokio::spawn(async move {
            loop {
                let set = rx.borrow_and_update().clone();
                // Each change is a whole new set: `Reset`, so addresses that left are dropped.
                if tx.send(Update::Reset(set)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    // remora stopped following the name (idle, or shut down): stop too.
                    _ = tx.closed() => return,
                }
            }
        });
        Some(updates)
    }
}

/// What the request loop and the backends saw.
#[derive(Debug)]
pub struct Report {
    /// Which backend answered each request of the loop, in order.
    pub answers: Vec<String>,
    /// Requests done (answered or failed) when the registry switched to B.
    pub switched_after: usize,
    /// Requests that failed: an error, or a status other than 200.
    pub failed: usize,
    /// The backends' own log: who served each request, in order of arrival.
    pub served: Vec<String>,
}

/// Requests before the switch, and answers from B before the loop stops; the loop gives up
/// after `MAX` requests (the switch never showing is a failure too).
pub const BEFORE: usize = 20;
pub const AFTER: usize = 20;
pub const MAX: usize = 5_000;

pub async fn demo() -> Result<Report, BoxError> {
    let served = support::Log::default();
    let mut backends = Vec::new();
    for name in ["A", "B"] {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        backends.push(listener.local_addr()?);
        let log = served.clone();
        tokio::spawn(support::serve(listener, move |_| {
            log.push(name);
            support::text(StatusCode::OK, name)
        }));
    }
    let (registry, rx) = watch::channel(vec![EndpointSpec::new(backends[0])]);

    let proxy = Proxy::builder()
        .inbound(Listen::Off)
        .outbound(Listen::Addr("127.0.0.1:0".parse()?))
        .admin(Listen::Off)
        .discover("registry", Registry(rx))
        .dns_fallback(false) // names the registry does not know fail; never looked up
        .bind()
        .await?;
    let outbound = proxy.outbound_addr().ok_or("no outbound listener")?;
    let running = proxy.spawn();
    running.ready().await;

    // The loop: one kept-alive client connection, one request after another.
    let (progress, mut done) = watch::channel(0);
    let traffic = tokio::spawn(async move {
        let (mut answers, mut failed) = (Vec::<String>::new(), 0);
        let mut client = support::Client::connect(outbound).await?;
        while answers.iter().filter(|a| *a == "B").count() < AFTER && answers.len() + failed < MAX {
            match client.get("http://billing.internal/charge", &[]).await {
                Ok((StatusCode::OK, body)) => answers.push(body),
                Ok(_) => failed += 1,
                // A broken connection: count it, carry on with a new one.
                Err(_) => {
                    (failed, client) = (failed + 1, support::Client::connect(outbound).await?)
                }
            }
            progress.send_replace(answers.len() + failed);
        }
        Ok::<_, BoxError>((answers, failed))
    });

    // Switch once the loop is well under way, without pausing it. (An error here means the
    // loop has ended: awaiting it below tells why.)
    let _ = done.wait_for(|n| *n >= BEFORE).await;
    let switched_after = *done.borrow();
    registry.send_replace(vec![EndpointSpec::new(backends[1])]);
    let (answers, failed) = traffic.await??;
    running.shutdown();
    running.wait().await?;
    Ok(Report {
        answers,
        switched_after,
        failed,
        served: served.entries(),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let r = demo().await?;
    let to_a = r.answers.iter().take_while(|a| *a == "A").count();
    let to_b = r.answers.len() - to_a;
    let (failed, switch) = (r.failed, r.switched_after);
    println!("{to_a} requests to A, then {to_b} to B; {failed} failed; switched after {switch}");
    Ok(())
}
