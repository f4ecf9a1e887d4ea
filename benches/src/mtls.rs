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
    // The benches' own backend (hyper, HTTP/1.1 and h2c, 128-byte `/small`).
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let app = free_port();
    let _backend = spawn(
        "1",
        me.to_str().unwrap_or(""),
        &["backend", &app.to_string()],
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
    println!("| direct (the benches backend) | {direct:.0} | – |");
    println!(
        "| two proxies, plaintext between them | {plain:.0} | +{:.0} µs |",
        plain - direct
    );
    println!(
        "| two proxies, mTLS between them | {mtls:.0} | +{:.0} µs |",
        mtls - direct
    );
    println!("\nmTLS over plaintext: {:+.0} µs per request", mtls - plain);

    // Handshakes into the server proxy's inbound (fresh TCP + TLS 1.3 each).
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let h = handshakes(server.0.id(), s_in, &client_dir, &web_id, window)?;
    println!(
        "\n### Handshakes\n\nFresh TCP + TLS 1.3 connections with one HTTP/1.1 request each, from one loop for {window:?}: the server proxy's CPU per connection was {:.0} µs in plaintext, {:.0} µs with full handshakes ({:.0} connections/s) and {:.0} µs resuming the previous session ({:.0}/s; {} of {} resumed).",
        h.plain_us, h.full_us, h.full_per_s, h.resumed_us, h.resumed_per_s, h.resumed, h.resumed_of
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// What [`handshakes`] measured.
pub(crate) struct Handshakes {
    /// The same connection and request in plaintext: what is not the handshake.
    pub plain_us: f64,
    /// The server proxy's CPU per connection (µs) when every handshake is a full one.
    pub full_us: f64,
    pub full_per_s: f64,
    /// The same when each connection resumes the session its predecessor received.
    pub resumed_us: f64,
    pub resumed_per_s: f64,
    /// Connections of the second loop that did resume, of all it made.
    pub resumed: u64,
    pub resumed_of: u64,
}

/// The mTLS handshake cost on the server side: a plaintext loop, then two loops of fresh TCP + TLS 1.3 connections
/// into `port` (a proxy's inbound, `pid`), each carrying one HTTP/1.1 request (which also
/// makes the client read the session tickets the server sends after the handshake). The
/// first loop disables resumption; the second shares one client configuration, as a proxy
/// does per peer, so each connection resumes the session the one before it received.
pub(crate) fn handshakes(
    pid: u32,
    port: u16,
    client_dir: &std::path::Path,
    server: &remora_certs::SpiffeId,
    window: Duration,
) -> Result<Handshakes, String> {
    let creds = remora_certs::validate::load_dir(client_dir).map_err(|e| e.to_string())?;
    let anchors = Arc::new(remora_certs::validate::anchors(&creds.roots)?);
    let shared = remora_certs::tls::client_config(&creds, anchors, server.clone(), b"http/1.1")
        .map_err(|e| e.to_string())?;
    let mut fresh = (*shared).clone();
    fresh.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    let name = remora_certs::tls::server_name(server)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // Plaintext first (permissive inbound): what a connection and its request cost without TLS.
    let (plain_n, _, plain_cpu) = rt.block_on(handshake_loop(pid, port, window, None))?;
    let run = |cfg: Arc<tokio_rustls::rustls::ClientConfig>| {
        let tls = (tokio_rustls::TlsConnector::from(cfg), name.clone());
        rt.block_on(handshake_loop(pid, port, window, Some(tls)))
    };
    let (full_n, _, full_cpu) = run(Arc::new(fresh))?;
    let (res_n, resumed, res_cpu) = run(shared)?;
    let secs = window.as_secs_f64();
    Ok(Handshakes {
        plain_us: plain_cpu * 1e6 / plain_n.max(1) as f64,
        full_us: full_cpu * 1e6 / full_n.max(1) as f64,
        full_per_s: full_n as f64 / secs,
        resumed_us: res_cpu * 1e6 / res_n.max(1) as f64,
        resumed_per_s: res_n as f64 / secs,
        resumed,
        resumed_of: res_n,
    })
}

/// Fresh connections into `port` for `window`, each with one HTTP/1.1 request read to its end:
/// plaintext, or TLS with `tls`. Returns the connections made, how many resumed a session, and
/// the CPU seconds `pid` spent meanwhile.
async fn handshake_loop(
    pid: u32,
    port: u16,
    window: Duration,
    tls: Option<(
        tokio_rustls::TlsConnector,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    )>,
) -> Result<(u64, u64, f64), String> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn one_request(mut s: impl AsyncRead + AsyncWrite + Unpin) -> Result<(), String> {
        s.write_all(b"GET /small HTTP/1.1\r\nhost: web.test\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("request to the inbound: {e}"))?;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        match answer.starts_with(b"HTTP/1.1 200") {
            true => Ok(()),
            false => Err(format!(
                "the inbound answered {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(80)])
            )),
        }
    }
    let before = cpu_seconds(pid);
    let start = Instant::now();
    let (mut n, mut resumed) = (0u64, 0u64);
    while start.elapsed() < window {
        let tcp = tokio::net::TcpStream::connect(loopback(port))
            .await
            .map_err(|e| format!("connect to the inbound: {e}"))?;
        match &tls {
            None => one_request(tcp).await?,
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("mTLS handshake with the inbound: {e}"))?;
                if stream.get_ref().1.handshake_kind()
                    == Some(tokio_rustls::rustls::HandshakeKind::Resumed)
                {
                    resumed += 1;
                }
                one_request(stream).await?;
            }
        }
        n += 1;
    }
    Ok((n, resumed, cpu_seconds(pid) - before))
}
