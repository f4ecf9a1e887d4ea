//! Embedding remora's proxy in another program: build a `Config`, bind, run until Ctrl-C.
//!
//! cargo run -p remora-proxy --example embed -- 127.0.0.1:8080

use std::net::SocketAddr;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    let cfg = remora_proxy::Config {
        app_addr: app,
        inbound_addr: "127.0.0.1:0".parse()?,
        outbound_addr: "127.0.0.1:0".parse()?,
        admin_addr: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    let proxy = remora_proxy::Proxy::bind(cfg).await?;
    println!(
        "inbound {} → app {app}; outbound {}; admin http://{}/metrics",
        proxy.inbound_addr(),
        proxy.outbound_addr(),
        proxy.admin_addr()
    );
    let report = proxy
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    println!(
        "stopped; {} connections cut at the drain deadline",
        report.cut
    );
    Ok(())
}
