//! The identity issue's benchmark: mTLS handshakes per second into a proxy's inbound, and the
//! latency mTLS adds between two proxies (outbound → inbound) over plaintext.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Guard, build_proxy, cpu_seconds, free_port, proxy_env, spawn, wait_port, wait_ready};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Mean request time from h2load's "time for request" line, in microseconds.
fn mean_us(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("time for request:"))?;
    let mean = line.split_whitespace().nth(5)?;
    let (num, unit) = mean.split_at(mean.find(|c: char| c.is_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v,
        "ms" => v * 1000.0,
        "s" => v * 1e6,
        _ => return None,
    })
}

fn h2load_latency(port: u16, secs: u64) -> Result<f64, String> {
    let url = format!("http://127.0.0.1:{port}/small");
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "h2load",
            "-c",
            "1",
            "-m",
            "1",
            "--rps",
            "1000",
            "-D",
            &secs.to_string(),
        ])
        .args(["-H", ":authority: web.test:80", &url])
        .output()
        .map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(" 0 failed") {
        return Err(format!("h2load saw failures:\n{text}"));
    }
    mean_us(&text).ok_or_else(|| format!("cannot read h2load's latency:\n{text}"))
}

pub fn run(quick: bool) -> Result<(), String> {
    let bin = build_proxy()?;
    let bin = bin.to_str().unwrap_or("remora-proxy").to_string();
    let tmp = std::env::temp_dir().join(format!("remora-bench-mtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let ca = tmp.join("ca");
    remora_certs::ca::init_dir(&ca, "cluster.local").map_err(|e| e.to_string())?;
    let issuer = remora_certs::ca::LoadedIssuer::from_dir(&ca).map_err(|e| e.to_string())?;
    let ident = |sa: &str| -> Result<(remora_certs::SpiffeId, std::path::PathBuf), String> {
        let id = remora_certs::SpiffeId::workload("cluster.local", "default", sa)
            .map_err(|e| e.to_string())?;
        let leaf = remora_certs::ca::issue_with_new_key(&issuer, &id, Duration::from_secs(3600))
            .map_err(|e| e.to_string())?;
        leaf.write(&tmp.join(sa)).map_err(|e| e.to_string())?;
        Ok((id, tmp.join(sa)))
    };
    let (web_id, web_dir) = ident("web")?;
    let (_, client_dir) = ident("client")?;
    std::fs::write(tmp.join("small"), vec![b'x'; 128]).map_err(|e| e.to_string())?;
    let app = free_port();
    let _nghttpd = spawn(
        "1",
        "nghttpd",
        &[
            "--no-tls",
            "-d",
            tmp.to_str().unwrap_or("."),
            &app.to_string(),
        ],
        &[],
    )?;
    wait_port(app)?;

    // Server proxy (identity web) and two client proxies: plaintext and mTLS to it.
    let (s_in, s_out, s_admin) = (free_port(), free_port(), free_port());
    let mut env = proxy_env(s_in, s_out, s_admin, app);
    env.push(("REMORA_IDENTITY_DIR", web_dir.display().to_string()));
    let server = spawn("0", &bin, &[], &env)?;
    wait_ready(s_admin)?;
    let client = |dest: String, identity: bool| -> Result<(Guard, u16), String> {
        let (i, o, a) = (free_port(), free_port(), free_port());
        let mut env = proxy_env(i, o, a, 9);
        env.push(("REMORA_DESTINATIONS", dest));
        if identity {
            env.push(("REMORA_IDENTITY_DIR", client_dir.display().to_string()));
        }
        let g = spawn("0", &bin, &[], &env)?;
        wait_ready(a)?;
        Ok((g, o))
    };
    let (_plain, plain_out) = client(format!("web.test:80=127.0.0.1:{s_in}"), false)?;
    let (_mtls, mtls_out) = client(format!("web.test:80=127.0.0.1:{s_in}#{web_id}"), true)?;

    let secs = if quick { 3 } else { 10 };
    let direct = h2load_latency(app, secs)?;
    let plain = h2load_latency(plain_out, secs)?;
    let mtls = h2load_latency(mtls_out, secs)?;
    println!(
        "## mTLS\n\n### Latency, outbound → inbound, h2c from the client, 1k rps on one connection for {secs} s (h2load -c 1 -m 1 --rps 1000; mean)\n"
    );
    println!("| path | mean µs | over direct |\n|---|---|---|");
    println!("| direct (nghttpd) | {direct:.0} | – |");
    println!(
        "| two proxies, plaintext between them | {plain:.0} | +{:.0} µs |",
        plain - direct
    );
    println!(
        "| two proxies, mTLS between them | {mtls:.0} | +{:.0} µs |",
        mtls - direct
    );
    println!("\nmTLS over plaintext: {:+.0} µs per request", mtls - plain);

    // Handshakes per second into the server proxy's inbound (fresh TCP + TLS 1.3 each).
    let creds = remora_certs::validate::load_dir(&client_dir).map_err(|e| e.to_string())?;
    let anchors = Arc::new(remora_certs::validate::anchors(&creds.roots)?);
    let cfg = remora_certs::tls::client_config(&creds, anchors, web_id.clone(), b"h2")
        .map_err(|e| e.to_string())?;
    let name = remora_certs::tls::server_name(&web_id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let pid = server.0.id();
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let (n, cpu) = rt.block_on(async move {
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let before = cpu_seconds(pid);
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < window {
            let Ok(tcp) = tokio::net::TcpStream::connect(loopback(s_in)).await else {
                break;
            };
            if connector.connect(name.clone(), tcp).await.is_ok() {
                n += 1;
            }
        }
        (n, cpu_seconds(pid) - before)
    });
    println!(
        "\n### Handshakes\n\n{n} mTLS handshakes in {window:?} from one client connection loop: {:.0} handshakes/s; the server proxy spent {:.0} µs CPU per handshake",
        n as f64 / window.as_secs_f64(),
        cpu * 1e6 / n.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
