//! Traffic policy (issue "traffic policy without CRDs"): what it costs and whether it holds.
//!
//! `remora control` (file source) feeds three proxies: a client proxy pinned to CPU 0 (the
//! one measured) and two server proxies in front of nghttpd, all on the release build, with
//! certificates from the control plane. Rows:
//! - CPU per request of the client proxy with no policy against every outbound policy at once
//!   (timeout, retries, failure accrual, a header route that does not match, a 5 % split to a
//!   service on the same endpoint), same run, alternating repetitions;
//! - a rate limit of 100 rps on the second server under 1,000 rps offered (h2load `--rps`),
//!   the rate served after the first second's burst;
//! - a canary split of 5 % over 10,000 requests, the share observed;
//! - zone-aware routing: four backends (in this process, answering after an adjustable delay),
//!   two in the client's zone on 127.0.0.1 and two in another on 127.0.0.2 behind a 1 ms
//!   "cross-zone hop"; at 1,000 rps the same-zone share while healthy, then how soon traffic
//!   spills over once the local backends slow to 10 ms, and how soon it returns after.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Guard, cpu_seconds, free_port, spawn, wait_port, wait_ready};

const TD: &str = "bench.local";
/// The injected cross-zone hop: what zone b's backends add to every answer.
const CROSS_ZONE_US: u64 = 1_000;
/// What zone a's backends slow to in the spill-over run.
const SLOWED_US: u64 = 10_000;

/// `h2load` with `args`; (2xx responses, all responses).
fn h2load_codes(args: &[&str]) -> Result<(u64, u64), String> {
    let out = std::process::Command::new("taskset")
        .args(["-c", "1", "h2load"])
        .args(args)
        .output()
        .map_err(|e| format!("h2load: {e} (benches/setup.sh)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .ok_or_else(|| format!("cannot read h2load's output:\n{text}"))?;
    // "status codes: 10000 2xx, 0 3xx, 0 4xx, 0 5xx"
    let counts: Vec<u64> = line
        .trim_start_matches("status codes:")
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    Ok((counts.first().copied().unwrap_or(0), counts.iter().sum()))
}

struct Mesh {
    _guards: Vec<Guard>,
    client_pid: u32,
    client_out: u16,
    client_admin: u16,
    /// The zone row's backends: two in zone a, then two in zone b.
    zoned: Vec<DelayServer>,
}

/// An HTTP/1.1 + HTTP/2 backend answering 128 bytes after `delay_us`, counting requests.
struct DelayServer {
    port: u16,
    hits: Arc<AtomicU64>,
    delay_us: Arc<AtomicU64>,
}

impl DelayServer {
    /// Serves on `ip` from a thread of its own (a current-thread runtime).
    fn start(ip: [u8; 4], delay_us: u64) -> Result<DelayServer, String> {
        let listener = std::net::TcpListener::bind(std::net::SocketAddr::from((ip, 0)))
            .map_err(|e| format!("bind: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let hits = Arc::new(AtomicU64::new(0));
        let delay = Arc::new(AtomicU64::new(delay_us));
        let (h, d) = (hits.clone(), delay.clone());
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((tcp, _)) = listener.accept().await {
                    let _ = tcp.set_nodelay(true);
                    let (h, d) = (h.clone(), d.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |_req| {
                            h.fetch_add(1, Ordering::Relaxed);
                            let us = d.load(Ordering::Relaxed);
                            async move {
                                if us > 0 {
                                    tokio::time::sleep(Duration::from_micros(us)).await;
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(
                                        &[b'x'; 128],
                                    )),
                                ))
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                    });
                }
            });
        });
        Ok(DelayServer {
            port,
            hits,
            delay_us: delay,
        })
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

fn start(dir: &std::path::Path) -> Result<Mesh, String> {
    let remora = crate::build_bin("remora")?;
    let proxy = crate::build_proxy()?;
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    remora_certs::ca::init_dir(&dir.join("ca"), TD).map_err(|e| e.to_string())?;
    let mut guards = Vec::new();
    // The backend.
    let docroot = dir.join("www");
    std::fs::create_dir_all(&docroot).map_err(|e| e.to_string())?;
    std::fs::write(docroot.join("index.html"), vec![b'x'; 128]).map_err(|e| e.to_string())?;
    let backend = free_port();
    guards.push(spawn(
        "1",
        "nghttpd",
        &["--no-tls", "-d", &s(&docroot), &backend.to_string()],
        &[],
    )?);
    wait_port(backend)?;
    // Tokens for the three proxies; the control plane.
    let names = ["client", "web", "limited"];
    let tokens: String = names
        .iter()
        .map(|n| format!("bench-{n}-token-0123456789 spiffe://{TD}/ns/bench/sa/{n}\n"))
        .collect();
    std::fs::write(dir.join("tokens"), tokens).map_err(|e| e.to_string())?;
    let ports: Vec<(u16, u16, u16)> = names
        .iter()
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let (web_in, limited_in) = (ports[1].0, ports[2].0);
    // Zone a on 127.0.0.1, where the client proxy connects to the control plane from: the
    // control plane tells it "zone a" from these endpoints.
    let zoned = vec![
        DelayServer::start([127, 0, 0, 1], 0)?,
        DelayServer::start([127, 0, 0, 1], 0)?,
        DelayServer::start([127, 0, 0, 2], CROSS_ZONE_US)?,
        DelayServer::start([127, 0, 0, 2], CROSS_ZONE_US)?,
    ];
    let zoned_eps: Vec<String> = zoned
        .iter()
        .enumerate()
        .map(|(i, z)| {
            let (ip, zone) = if i < 2 { (1, "a") } else { (2, "b") };
            format!(
                "{{ addr = \"127.0.0.{ip}:{}\", zone = \"{zone}\" }}",
                z.port
            )
        })
        .collect();
    let eps = format!(
        "[[service]]\nname = \"plain.bench:80\"\nendpoints = [{{ addr = \"127.0.0.1:{web_in}\" }}]\n\
         [[service]]\nname = \"policied.bench:80\"\ntimeout = \"5s\"\nretries = 2\nfailure_accrual = 7\n\
         routes = \"header:x-bench-route=never=>plain.bench:80\"\nsplit = \"canary.bench:80=5\"\n\
         endpoints = [{{ addr = \"127.0.0.1:{web_in}\" }}]\n\
         [[service]]\nname = \"canary.bench:80\"\nendpoints = [{{ addr = \"127.0.0.1:{web_in}\" }}]\n\
         [[service]]\nname = \"limited.bench:80\"\nrate_limit = 100\n\
         endpoints = [{{ addr = \"127.0.0.1:{limited_in}\" }}]\n\
         [[service]]\nname = \"split.bench:80\"\nsplit = \"splitcanary.bench:80=5\"\n\
         endpoints = [{{ addr = \"127.0.0.1:{web_in}\" }}]\n\
         [[service]]\nname = \"splitcanary.bench:80\"\n\
         endpoints = [{{ addr = \"127.0.0.1:{backend}\" }}]\n\
         [[service]]\nname = \"zoned.bench:80\"\nendpoints = [{}]\n",
        zoned_eps.join(", ")
    );
    std::fs::write(dir.join("endpoints.toml"), eps).map_err(|e| e.to_string())?;
    let (cp_port, cp_admin) = (free_port(), free_port());
    let cp_addr = format!("127.0.0.1:{cp_port}");
    guards.push(spawn(
        "1",
        &s(&remora),
        &[
            "control",
            "--issuer",
            &s(&dir.join("ca")),
            "--trust-domain",
            TD,
            "--endpoints-file",
            &s(&dir.join("endpoints.toml")),
            "--bootstrap-tokens",
            &s(&dir.join("tokens")),
            "--addr",
            &cp_addr,
            "--admin-addr",
            &format!("127.0.0.1:{cp_admin}"),
        ],
        &[("REMORA_LOG", "warn".into())],
    )?);
    wait_ready(cp_admin)?;
    let mut client_pid = 0;
    for (i, n) in names.iter().enumerate() {
        let (inb, out, adm) = ports[i];
        let id_dir = dir.join(format!("id-{n}"));
        std::fs::create_dir_all(&id_dir).map_err(|e| e.to_string())?;
        std::fs::copy(dir.join("ca/ca.crt"), id_dir.join("ca.crt")).map_err(|e| e.to_string())?;
        std::fs::write(id_dir.join("token"), format!("bench-{n}-token-0123456789"))
            .map_err(|e| e.to_string())?;
        let mut env = crate::proxy_env(inb, out, adm, backend);
        env.extend([
            ("REMORA_IDENTITY_DIR", s(&id_dir)),
            ("REMORA_IDENTITY_MODE", "control".into()),
            ("REMORA_IDENTITY", format!("spiffe://{TD}/ns/bench/sa/{n}")),
            ("REMORA_IDENTITY_TOKEN", s(&id_dir.join("token"))),
            ("REMORA_CONTROL_ADDR", cp_addr.clone()),
        ]);
        // The measured proxy alone on CPU 0.
        let cpu = if i == 0 { "0" } else { "1" };
        let g = spawn(cpu, &s(&proxy), &[], &env)?;
        wait_ready(adm)?;
        if i == 0 {
            client_pid = g.0.id();
        }
        guards.push(g);
    }
    Ok(Mesh {
        _guards: guards,
        client_pid,
        client_out: ports[0].1,
        client_admin: ports[0].2,
        zoned,
    })
}

/// CPU µs per request of the client proxy for `n` requests to `authority`.
fn cpu_per_request(m: &Mesh, authority: &str, n: u32) -> Result<f64, String> {
    let url = format!("http://127.0.0.1:{}/index.html", m.client_out);
    let auth = format!(":authority: {authority}");
    let before = cpu_seconds(m.client_pid);
    let (ok, all) = h2load_codes(&[
        "-n",
        &n.to_string(),
        "-c",
        "16",
        "-m",
        "10",
        "-H",
        &auth,
        &url,
    ])?;
    let after = cpu_seconds(m.client_pid);
    if ok != u64::from(n) || all != u64::from(n) {
        return Err(format!("{authority}: {ok} of {n} requests succeeded"));
    }
    Ok((after - before) * 1e6 / f64::from(n))
}

/// Requests the client proxy sent to `destination`'s endpoints so far.
fn sent_to(m: &Mesh, destination: &str) -> f64 {
    let text = crate::admin_get(m.client_admin, "/metrics");
    let want = format!("destination=\"{destination}\"");
    text.lines()
        .filter(|l| l.starts_with("remora_endpoint_requests_total{") && l.contains(&want))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The canary's share of `n` requests to a service splitting 5 % off to it.
fn split_share(m: &Mesh, n: u32) -> Result<f64, String> {
    let url = format!("http://127.0.0.1:{}/index.html", m.client_out);
    let before = (
        sent_to(m, "split.bench:80"),
        sent_to(m, "splitcanary.bench:80"),
    );
    let (ok, _) = h2load_codes(&[
        "-n",
        &n.to_string(),
        "-c",
        "10",
        "-m",
        "1",
        "-H",
        ":authority: split.bench:80",
        &url,
    ])?;
    if ok != u64::from(n) {
        return Err(format!("split: {ok} of {n} requests succeeded"));
    }
    let stable = sent_to(m, "split.bench:80") - before.0;
    let canary = sent_to(m, "splitcanary.bench:80") - before.1;
    Ok(canary / (stable + canary) * 100.0)
}

/// What the zone-aware run found.
struct ZoneRun {
    healthy_local: f64,
    spill_ms: Option<u128>,
    slow_remote: f64,
    back_ms: Option<u128>,
    /// Same-zone share over the run's last second.
    last_local: f64,
    failed: u64,
}

/// 1,000 rps to `zoned.bench:80` for 9 s: healthy for 2 s, zone a slowed to [`SLOWED_US`]
/// for 2.5 s, healthy again. The backends' counters are sampled every 10 ms.
fn zone_run(m: &Mesh) -> Result<ZoneRun, String> {
    let url = format!("http://127.0.0.1:{}/index.html", m.client_out);
    // Learn the latencies first (the other zone is tried once, then remembered).
    h2load_codes(&[
        "-c",
        "10",
        "--rps",
        "100",
        "-D",
        "2",
        "-H",
        ":authority: zoned.bench:80",
        &url,
    ])?;
    let load = std::thread::spawn(move || {
        h2load_codes(&[
            "-c",
            "10",
            "--rps",
            "100",
            "-D",
            "9",
            "-H",
            ":authority: zoned.bench:80",
            &url,
        ])
    });
    let count = |m: &Mesh| -> (u64, u64) {
        let z = &m.zoned;
        (z[0].hits() + z[1].hits(), z[2].hits() + z[3].hits())
    };
    let start = Instant::now();
    let (slow_at, fast_at) = (Duration::from_secs(2), Duration::from_millis(4_500));
    let mut samples: Vec<(Duration, u64, u64)> = Vec::new();
    let mut phase = 0;
    while !load.is_finished() {
        let t = start.elapsed();
        if phase == 0 && t >= slow_at {
            m.zoned[0].delay_us.store(SLOWED_US, Ordering::Relaxed);
            m.zoned[1].delay_us.store(SLOWED_US, Ordering::Relaxed);
            phase = 1;
        } else if phase == 1 && t >= fast_at {
            m.zoned[0].delay_us.store(0, Ordering::Relaxed);
            m.zoned[1].delay_us.store(0, Ordering::Relaxed);
            phase = 2;
        }
        let (l, r) = count(m);
        samples.push((t, l, r));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, all) = load
        .join()
        .map_err(|_| "h2load thread panicked".to_string())??;
    // Shares over [from, to).
    let share = |from: Duration, to: Duration| -> (f64, f64) {
        let at = |t: Duration| {
            samples
                .iter()
                .find(|s| s.0 >= t)
                .or(samples.last())
                .map(|s| (s.1, s.2))
                .unwrap_or((0, 0))
        };
        let (a, b) = (at(from), at(to));
        let (l, r) = ((b.0 - a.0) as f64, (b.1 - a.1) as f64);
        let n = (l + r).max(1.0);
        (l / n * 100.0, r / n * 100.0)
    };
    // The first 100 ms window after `after` where `cond(local %, remote %)` holds.
    let first_window = |after: Duration, until: Duration, cond: &dyn Fn(f64, f64) -> bool| {
        samples
            .iter()
            .map(|s| s.0)
            .filter(|t| *t >= after && *t + Duration::from_millis(100) <= until)
            .find(|t| {
                let (l, r) = share(*t, *t + Duration::from_millis(100));
                cond(l, r)
            })
            .map(|t| (t - after).as_millis())
    };
    let end = samples.last().map(|s| s.0).unwrap_or_default();
    Ok(ZoneRun {
        healthy_local: share(Duration::ZERO, slow_at).0,
        spill_ms: first_window(slow_at, fast_at, &|_, r| r >= 50.0),
        slow_remote: share(slow_at + Duration::from_secs(1), fast_at).1,
        back_ms: first_window(fast_at, end, &|l, _| l >= 90.0),
        last_local: share(end.saturating_sub(Duration::from_secs(1)), end).0,
        failed: all.saturating_sub(ok),
    })
}

pub fn run(quick: bool) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("remora-bench-policy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = start(&dir)?;
    let (n, reps) = if quick { (2_000, 1) } else { (40_000, 5) };
    // Warm both names (discovery, connections).
    for a in ["plain.bench:80", "policied.bench:80"] {
        cpu_per_request(&m, a, n / 4)?;
    }
    let (mut none, mut all) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        none.push(cpu_per_request(&m, "plain.bench:80", n)?);
        all.push(cpu_per_request(&m, "policied.bench:80", n)?);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (none_m, all_m) = (med(none.clone()), med(all.clone()));
    // The rate limit: 10 connections × 100 rps offered for `secs`.
    let secs: u64 = if quick { 3 } else { 10 };
    let url = format!("http://127.0.0.1:{}/index.html", m.client_out);
    let (served, answered) = h2load_codes(&[
        "-c",
        "10",
        "--rps",
        "100",
        "-D",
        &secs.to_string(),
        "-H",
        ":authority: limited.bench:80",
        &url,
    ])?;
    // The first second's burst (one second's worth) comes on top of the rate.
    let held = (served.saturating_sub(100)) as f64 / secs as f64;
    let split_n: u32 = if quick { 2_000 } else { 10_000 };
    let split = split_share(&m, split_n)?;
    let zone = zone_run(&m)?;
    let ms = |v: Option<u128>| v.map_or("not within the run".to_string(), |v| format!("{v} ms"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Traffic policy: cost and rate limit\n\nMade by `cargo run -p benches --release -- policy{}` on this 2-core VM: the client proxy (release build) pinned to CPU 0 with one worker, h2load, nghttpd, the server proxies and `remora control` on CPU 1.\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        out,
        "| row | result |\n|---|---|\n| client proxy CPU per request, no policy (median of {reps}) | {none_m:.2} µs ({}) |\n| client proxy CPU per request, timeout + retries + failure accrual + a header route + a 5 % split (median of {reps}) | {all_m:.2} µs ({}), {:+.1} % |\n| rate limit 100 rps, 1,000 rps offered for {secs} s | {served} of {answered} served: {held:.1} rps after the first second's burst of 100 ({:+.1} % of the limit) |",
        none.iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        all.iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        (all_m / none_m - 1.0) * 100.0,
        (held / 100.0 - 1.0) * 100.0,
    );
    let _ = writeln!(
        out,
        "| canary split of 5 %, {split_n} requests | {split:.2} % went to the canary ({:+.2} points) |\n\
         | zone-aware, 1,000 rps, 2 + 2 backends, the other zone {} ms away: same-zone share while healthy | {:.1} % |\n\
         | zone-aware: local backends slowed to {} ms — spill-over (most requests to the other zone in a 100 ms window) | after {}; {:.1} % to the other zone from 1 s after the slowdown on |\n\
         | zone-aware: local backends fast again — back (≥ 90 % same-zone in a 100 ms window) | after {}; {:.1} % same-zone over the last second; failed requests in the whole run: {} |",
        split - 5.0,
        CROSS_ZONE_US as f64 / 1000.0,
        zone.healthy_local,
        SLOWED_US / 1000,
        ms(zone.spill_ms),
        zone.slow_remote,
        ms(zone.back_ms),
        zone.last_local,
        zone.failed,
    );
    print!("{out}");
    if !quick {
        let path = crate::workspace().join("benches/results/policy.md");
        std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    drop(m);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
