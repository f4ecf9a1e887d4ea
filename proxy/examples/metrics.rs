//! remora's metrics in the application's own `prometheus_client` registry, beside a metric of
//! the application's (`shop_orders_total`), served by the application's `/metrics` — reached,
//! like everything else, through remora's inbound listener. One scrape shows both.
//!
//!     cargo run -p remora-proxy --example metrics

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use remora_proxy::{Completion, Hooks, Listen, Proxy};
use support::BoxError;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// remora counts a request when its response ends on the proxy's side, with no promise that
/// this comes before the client has read it; `on_completion` runs right after the count, so
/// waiting for it makes the scrape below exact.
struct Completed(Arc<Semaphore>);

impl Hooks for Completed {
    fn on_completion(&self, _: &Completion) {
        self.0.add_permits(1);
    }
}

#[derive(Debug)]
pub struct Report {
    /// Orders placed through the sidecar.
    pub orders: u32,
    /// The application's `/metrics`, scraped through the sidecar after the orders.
    pub scrape: String,
}

/// The sum of the samples `name{…}` whose labels include all of `labels` (`k="v"`); `None`
/// when there are none. (A sum: other labels, such as remora's `grpc_status`, split series.)
pub fn sample(scrape: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values = scrape.lines().filter_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        let ok =
            (rest.is_empty() || rest.starts_with('{')) && labels.iter().all(|l| rest.contains(l));
        ok.then(|| value.parse::<f64>().ok()).flatten()
    });
    values.reduce(|a, b| a + b)
}

pub async fn demo() -> Result<Report, BoxError> {
    // The application's registry and metric; remora's join them at `.registry(...)`.
    let mut registry = Registry::default();
    let orders = Counter::<u64>::default();
    registry.register("shop_orders", "Orders placed", orders.clone());

    let app = TcpListener::bind("127.0.0.1:0").await?;
    let done = Arc::new(Semaphore::new(0));
    let proxy = Proxy::builder()
        .app(app.local_addr()?)
        .inbound(Listen::Addr("127.0.0.1:0".parse()?))
        .outbound(Listen::Off)
        .admin(Listen::Off) // the application serves the metrics itself
        .hooks(Completed(done.clone()))
        .registry(&mut registry)
        .bind()
        .await?;
    let inbound = proxy.inbound_addr().ok_or("no inbound listener")?;

    // Registration is done: the registry is read-only from here, shared with the handler.
    let registry = Arc::new(registry);
    tokio::spawn(support::serve(app, move |req| match req.uri().path() {
        "/order" => {
            orders.inc();
            support::text(StatusCode::OK, "order placed\n")
        }
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => support::text(StatusCode::OK, text),
                Err(_) => support::text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        _ => support::text(StatusCode::NOT_FOUND, "no such page\n"),
    }));
    let running = proxy.spawn();
    running.ready().await;

    let host = [("host", "shop.local")];
    let placed: u32 = 3;
    for _ in 0..placed {
        let (status, _) = support::get(inbound, "/order", &host).await?;
        if status != StatusCode::OK {
            return Err(format!("/order answered {status}").into());
        }
    }
    // Every order is counted by remora once its completion has been reported.
    done.acquire_many(placed).await?.forget();
    let (_, scrape) = support::get(inbound, "/metrics", &host).await?;
    running.shutdown();
    running.wait().await?;
    Ok(Report {
        orders: placed,
        scrape,
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let r = demo().await?;
    let inbound_ok = sample(
        &r.scrape,
        "remora_requests_total",
        &[r#"direction="inbound""#, r#"status="200""#],
    );
    println!("placed {} orders; the scrape says:", r.orders);
    println!("  remora_requests_total{{direction=\"inbound\",status=\"200\"}} = {inbound_ok:?}");
    println!(
        "  shop_orders_total = {:?}",
        sample(&r.scrape, "shop_orders_total", &[])
    );
    Ok(())
}
