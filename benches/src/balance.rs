//! The load-balancing issue's benchmarks: share per backend under uniform load, a slow endpoint
//! (remora against Envoy's round robin, same client, same backends), a backend killed mid-run,
//! and one added mid-run.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Guard, admin_get, build_proxy, free_port, proxy_env, spawn, wait_ready, workspace};

pub(crate) fn grpc_backend(name: &str, extra: &[&str]) -> Result<(Guard, u16), String> {
    let mut child = Command::new("python3")
        .arg(workspace().join("tests/py/grpc_backend.py"))
        .args(["--name", name])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("python3: {e} (run .ci/setup)"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        use std::io::BufRead;
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("grpc backend {name} did not start"))?;
    Ok((Guard(child), port))
}

/// The Python grpcio client: `concurrent N C` through `target` with `authority`.
fn grpc_load(
    target: SocketAddr,
    authority: &str,
    n: usize,
    c: usize,
) -> Result<serde_like::Report, String> {
    let out = Command::new("taskset")
        .args(["-c", "1", "python3"])
        .arg(workspace().join("tests/py/grpc_client.py"))
        .args([
            &target.to_string(),
            "--authority",
            authority,
            "concurrent",
            &n.to_string(),
            &c.to_string(),
        ])
        .output()
        .map_err(|e| format!("grpc client: {e}"))?;
    serde_like::Report::parse(&String::from_utf8_lossy(&out.stdout))
}

/// Just enough JSON reading for the client's flat report (no serde in the harness).
mod serde_like {
    pub struct Report {
        pub backends: Vec<(String, u64)>,
        pub ok: u64,
        pub failed: u64,
        pub p50_ms: f64,
        pub p99_ms: f64,
    }

    fn object<'a>(s: &'a str, key: &str) -> &'a str {
        s.split(&format!("\"{key}\": {{"))
            .nth(1)
            .and_then(|r| r.split('}').next())
            .unwrap_or("")
    }

    fn number(s: &str, key: &str) -> f64 {
        s.split(&format!("\"{key}\": "))
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn pairs(obj: &str) -> Vec<(String, u64)> {
        obj.split(", ")
            .filter_map(|kv| {
                let (k, v) = kv.split_once(": ")?;
                Some((k.trim_matches('"').to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    impl Report {
        pub fn parse(s: &str) -> Result<Report, String> {
            if !s.contains("\"codes\"") {
                return Err(format!("unexpected grpc client output: {s:?}"));
            }
            let codes = pairs(object(s, "codes"));
            Ok(Report {
                backends: pairs(object(s, "backends")),
                ok: codes.iter().filter(|(k, _)| k == "OK").map(|x| x.1).sum(),
                failed: codes.iter().filter(|(k, _)| k != "OK").map(|x| x.1).sum(),
                p50_ms: number(s, "p50_ms"),
                p99_ms: number(s, "p99_ms"),
            })
        }

        pub fn share(&self, name: &str) -> f64 {
            let total: u64 = self.backends.iter().map(|x| x.1).sum();
            let n = self
                .backends
                .iter()
                .filter(|(k, _)| k == name)
                .map(|x| x.1)
                .sum::<u64>();
            n as f64 / total.max(1) as f64
        }
    }
}

fn start_remora(bin: &str, backends: &[u16]) -> Result<(Guard, u16, u16), String> {
    let (i, o, a) = (free_port(), free_port(), free_port());
    let mut env = proxy_env(i, o, a, 9);
    let eps: Vec<String> = backends.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    env.push((
        "REMORA_DESTINATIONS",
        format!("echo.test:80={}", eps.join(",")),
    ));
    let g = spawn("0", bin, &[], &env)?;
    wait_ready(a)?;
    Ok((g, o, a))
}

fn endpoint_counts(admin: u16) -> Vec<(String, f64)> {
    admin_get(admin, "/metrics")
        .lines()
        .filter(|l| l.starts_with("remora_endpoint_requests_total{"))
        .filter_map(|l| {
            let ep = l
                .split("endpoint=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_string();
            Some((ep, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn run(quick: bool) -> Result<(), String> {
    let bin = build_proxy()?;
    let bin = bin.to_str().unwrap_or("remora-proxy").to_string();
    let (_b1, p1) = grpc_backend("b1", &[])?;
    let (_b2, p2) = grpc_backend("b2", &[])?;
    let (b3, p3) = grpc_backend("b3", &[])?;
    let (_slow, ps) = grpc_backend("slow", &["--delay-ms", "50"])?;
    let calls = if quick { 600 } else { 4000 };

    // 1. Uniform: h2load at 1k rps on one connection; shares from the proxy's endpoint counters.
    let secs = if quick { 3 } else { 10 };
    let (_remora, out, admin) = start_remora(&bin, &[p1, p2, p3])?;
    let frame = std::env::temp_dir().join(format!("remora-grpc-bal-{}.bin", std::process::id()));
    let mut body = vec![0u8, 0, 0, 0, 5];
    body.extend_from_slice(b"share");
    std::fs::write(&frame, body).map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{out}/remora.test.Echo/Unary");
    let h = Command::new("taskset")
        .args([
            "-c",
            "1",
            "h2load",
            "-c",
            "1",
            "-m",
            "10",
            "--rps",
            "1000",
            "-D",
            &secs.to_string(),
        ])
        .args([
            "-d",
            frame.to_str().unwrap_or(""),
            "-H",
            ":authority: echo.test:80",
        ])
        .args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            &url,
        ])
        .output()
        .map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&h.stdout);
    let counts = endpoint_counts(admin);
    let total: f64 = counts.iter().map(|c| c.1).sum();
    println!(
        "## Balancing\n\n### Uniform: 3 equal grpcio backends, one HTTP/2 connection, 1k rps for {secs} s (h2load -c 1 -m 10 --rps 1000)\n"
    );
    println!(
        "{}",
        text.lines()
            .find(|l| l.starts_with("requests:"))
            .unwrap_or("")
    );
    println!("\n| backend | requests | share | deviation from even |\n|---|---|---|---|");
    for (ep, n) in &counts {
        let share = n / total.max(1.0);
        println!(
            "| {ep} | {n} | {:.1} % | {:+.1} % |",
            share * 100.0,
            (share * 3.0 - 1.0) * 100.0
        );
    }

    // 2. One slow endpoint, remora vs Envoy round robin, same client (grpcio, 8 in flight).
    println!(
        "\n### One slow endpoint (+50 ms): grpcio client, {calls} calls, 8 in flight on one channel\n"
    );
    println!(
        "| proxy | backends | calls to slow | p50 ms | p99 ms | failed |\n|---|---|---|---|---|---|"
    );
    let row = |name: &str, target: SocketAddr, set: &str| -> Result<f64, String> {
        let r = grpc_load(target, "echo.test:80", calls, 8)?;
        println!(
            "| {name} | {set} | {:.1} % | {:.2} | {:.2} | {} |",
            r.share("slow") * 100.0,
            r.p50_ms,
            r.p99_ms,
            r.failed
        );
        Ok(r.p99_ms)
    };
    let healthy = row("remora", loopback(out), "3 healthy")?;
    drop(_remora);
    let (_remora_slow, out_slow, _) = start_remora(&bin, &[p1, p2, ps])?;
    let slow = row("remora", loopback(out_slow), "2 healthy + slow")?;
    let tmp = std::env::temp_dir().join(format!("remora-balance-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let envoy = crate::peers::envoy(&tmp, &[p1, p2, p3])?;
    let e_port = envoy.h2;
    let e_healthy = row("Envoy 1.40 round robin", loopback(e_port), "3 healthy")?;
    let envoy_slow = crate::peers::envoy(&tmp, &[p1, p2, ps])?;
    let e_slow_port = envoy_slow.h2;
    let e_slow = row(
        "Envoy 1.40 round robin",
        loopback(e_slow_port),
        "2 healthy + slow",
    )?;
    println!(
        "\np99 with the slow endpoint over p99 all healthy: remora {:.2}×, Envoy round robin {:.2}×",
        slow / healthy.max(1e-9),
        e_slow / e_healthy.max(1e-9)
    );

    // 3a. A backend killed mid-run.
    let (_remora_kill, out_kill, admin_kill) = start_remora(&bin, &[p1, p2, p3])?;
    let target = loopback(out_kill);
    let load = std::thread::spawn(move || grpc_load(target, "echo.test:80", calls, 8));
    let deadline = Instant::now() + Duration::from_secs(30);
    while endpoint_counts(admin_kill).iter().map(|c| c.1).sum::<f64>() < (calls / 3) as f64 {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(b3); // SIGKILL
    let r = load.join().map_err(|_| "load thread panicked")??;
    println!(
        "\n### A backend killed mid-run (SIGKILL after a third of {calls} calls, 8 in flight)\n\n{} OK, {} failed (at most the calls in flight on the killed backend can fail; every later one is balanced away or retried unsent)",
        r.ok, r.failed
    );

    // 3b. A backend added mid-run: time until it takes its share (in-process proxy, updated
    // through the embedding API).
    let (_b4, p4) = grpc_backend("b4", &[])?;
    added(p1, p2, p4, if quick { 4 } else { 10 })?;
    let _ = std::fs::remove_file(&frame);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn added(p1: u16, p2: u16, p_new: u16, secs: u64) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let cfg = remora_proxy::Config {
            inbound_addr: loopback(0),
            outbound_addr: loopback(0),
            admin_addr: loopback(0),
            app_addr: loopback(9),
            destinations: vec![remora_proxy::StaticDestination::new("echo.test:80", &[loopback(p1), loopback(p2)])],
            ..Default::default()
        };
        let proxy = remora_proxy::Proxy::bind(cfg).await.map_err(|e| e.to_string())?;
        let (out, admin) = (
            proxy.outbound_addr().ok_or("no outbound listener")?,
            proxy.admin_addr().ok_or("no admin listener")?,
        );
        let dests = proxy.statics();
        let stop = proxy.shutdown_handle();
        let task = tokio::spawn(proxy.run(std::future::pending()));
        let frame = std::env::temp_dir().join(format!("remora-grpc-add-{}.bin", std::process::id()));
        let mut body = vec![0u8, 0, 0, 0, 3];
        body.extend_from_slice(b"add");
        std::fs::write(&frame, body).map_err(|e| e.to_string())?;
        let url = format!("http://{out}/remora.test.Echo/Unary");
        let load = tokio::task::spawn_blocking(move || {
            Command::new("taskset")
                .args(["-c", "1", "h2load", "-c", "1", "-m", "10", "--rps", "1000", "-D", &secs.to_string()])
                .args(["-d", frame.to_str().unwrap_or(""), "-H", ":authority: echo.test:80"])
                .args(["-H", "content-type: application/grpc", "-H", "te: trailers", &url])
                .output()
        });
        tokio::time::sleep(Duration::from_secs(secs / 3)).await;
        let new = loopback(p_new).to_string();
        let eps = |p| remora_proxy::EndpointSpec {
            addr: loopback(p),
            weight: 1,
            identity: None,
            opaque: false,
            quic: None,
            locality: Default::default(),
        };
        let added_at = Instant::now();
        dests.set("echo.test:80", vec![eps(p1), eps(p2), eps(p_new)]);
        // Sample the new endpoint's share of each 100 ms window until it reaches 80 % of even.
        let mut took = None;
        let (mut last_total, mut last_new) = (0.0, 0.0);
        while added_at.elapsed() < Duration::from_secs(secs) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let counts = tokio::task::spawn_blocking(move || endpoint_counts(admin.port()))
                .await
                .unwrap_or_default();
            let total: f64 = counts.iter().map(|c| c.1).sum();
            let n: f64 = counts.iter().filter(|c| c.0 == new).map(|c| c.1).sum();
            let window_share = (n - last_new) / (total - last_total).max(1.0);
            (last_total, last_new) = (total, n);
            if window_share >= 0.8 / 3.0 {
                took = Some(added_at.elapsed());
                break;
            }
        }
        let out = load.await.map_err(|e| e.to_string())?.map_err(|e| format!("h2load: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "\n### A backend added mid-run (1k rps, h2load -c 1 -m 10)\n\n{}\ntime until the new backend serves ≥ 80 % of an even share (100 ms windows): {}",
            text.lines().find(|l| l.starts_with("requests:")).unwrap_or(""),
            took.map(|t| format!("{t:.2?}")).unwrap_or_else(|| "not within the run".into())
        );
        stop.shutdown();
        let _ = task.await;
        Ok::<(), String>(())
    })
}
