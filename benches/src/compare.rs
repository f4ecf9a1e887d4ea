//! Side by side: remora, Envoy, nginx and haproxy against the same backend, on the same
//! machine, in the same run. Writes `benches/results/report.md` and SVG plots next to it.
//!
//! Method: each proxy pinned to CPU 0, the load generator and the backend to CPU 1; a warm-up
//! before counting; CPU from `/proc/PID/stat` of the proxy alone (CPU per request stays stable
//! even when the generator is the bottleneck); RSS from `/proc/PID/status`; medians of the
//! repetitions.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::peers::{self, Peer};
use crate::{Guard, build_proxy, cpu_seconds, free_port, rss_kib, spawn, wait_port, workspace};

#[derive(Default, Clone)]
struct Row {
    name: String,
    rps: f64,
    errors: u64,
    cpu_us: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    rss_idle_kib: Option<u64>,
    rss_peak_kib: Option<u64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Samples a process's RSS in the background; `stop()` returns the peak in KiB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> Self {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, p) = (stop.clone(), peak.clone());
        let thread = pid.map(|pid| {
            std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        RssSampler { stop, peak, thread }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// h2load: returns (rps, errors, requests done).
pub(crate) fn h2load(args: &[&str]) -> Result<(f64, u64, u64), String> {
    let out = Command::new("taskset")
        .args(["-c", "1", "h2load"])
        .args(args)
        .output()
        .map_err(|e| format!("h2load: {e} (benches/setup.sh)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("cannot read h2load's output:\n{text}"))?;
    let req = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("");
    let num = |k: &str| -> u64 {
        req.split(", ")
            .find(|p| p.ends_with(k))
            .and_then(|p| p.split_whitespace().rev().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let non2xx: u64 = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .map(|l| {
            l.split(", ")
                .skip(1)
                .filter_map(|p| p.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok((
        rps,
        num("errored") + num("timeout") + non2xx,
        num("succeeded"),
    ))
}

/// The gRPC open-loop generator (a child pinned to CPU 1): (ok, errors, p50, p99, p99.9) in µs.
fn grpc_load(port: u16, rps: u64, secs: u64) -> Result<(u64, u64, f64, f64, f64), String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new("taskset")
        .args(["-c", "1"])
        .arg(me)
        .args([
            "grpc-load",
            &format!("127.0.0.1:{port}"),
            "echo.test:80",
            &rps.to_string(),
            &secs.to_string(),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match v.as_slice() {
        [ok, err, p50, p99, p999] => Ok((*ok as u64, *err as u64, *p50, *p99, *p999)),
        _ => Err(format!(
            "grpc-load printed {text:?} ({})",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

struct Target {
    name: String,
    h2: u16,
    h1: u16,
    pid: Option<u32>,
    _guard: Option<Guard>,
}

impl From<Peer> for Target {
    fn from(p: Peer) -> Self {
        Target {
            name: p.name.to_string(),
            h2: p.h2,
            h1: p.h1,
            pid: Some(p.pid()),
            _guard: Some(p.guard),
        }
    }
}

fn cpu_of(pid: Option<u32>) -> f64 {
    pid.map(cpu_seconds).unwrap_or(0.0)
}

pub fn run(quick: bool) -> Result<(), String> {
    let bin = build_proxy()?;
    let bin = bin.to_str().unwrap_or("remora-proxy").to_string();
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let tmp = std::env::temp_dir().join(format!("remora-compare-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let backend = free_port();
    let _backend = spawn(
        "1",
        me.to_str().unwrap_or(""),
        &["backend", &backend.to_string()],
        &[],
    )?;
    wait_port(backend)?;

    let mut targets: Vec<Target> = vec![Target {
        name: "direct".into(),
        h2: backend,
        h1: backend,
        pid: None,
        _guard: None,
    }];
    let mut skipped = Vec::new();
    let mut idle = Vec::new();
    for (name, start) in [
        (
            "remora",
            Box::new(|| peers::remora(&bin, backend)) as Box<dyn Fn() -> Result<Peer, String>>,
        ),
        ("Envoy", Box::new(|| peers::envoy(&tmp, &[backend]))),
        ("nginx", Box::new(|| peers::nginx(&tmp, backend))),
        ("haproxy", Box::new(|| peers::haproxy(&tmp, backend))),
    ] {
        match start() {
            Ok(p) => {
                std::thread::sleep(Duration::from_millis(300));
                idle.push((name.to_string(), rss_kib(p.pid())));
                targets.push(p.into());
            }
            Err(e) => {
                eprintln!("benches: skipping {name}: {e}");
                skipped.push(format!("{name}: {e}"));
            }
        }
    }
    let reps = if quick { 1 } else { 3 };
    let n = if quick { 8_000 } else { 200_000 };

    // (1) one hop, h2c, 128-byte responses, fixed concurrency: max rps and CPU per request.
    let mut s1 = Vec::new();
    for t in &targets {
        let url = format!("http://127.0.0.1:{}/small", t.h2);
        h2load(&["-n", &(n / 4).to_string(), "-c", "16", "-m", "10", &url])?; // warm-up
        let (mut rps, mut cpu, mut errors) = (Vec::new(), Vec::new(), 0);
        let sampler = RssSampler::start(t.pid);
        for _ in 0..reps {
            let before = cpu_of(t.pid);
            let (r, e, done) = h2load(&["-n", &n.to_string(), "-c", "16", "-m", "10", &url])?;
            cpu.push((cpu_of(t.pid) - before) * 1e6 / done.max(1) as f64);
            rps.push(r);
            errors += e;
        }
        let peak = sampler.stop();
        s1.push(Row {
            name: t.name.clone(),
            rps: median(rps),
            errors,
            cpu_us: t.pid.map(|_| median(cpu)),
            rss_idle_kib: idle.iter().find(|i| i.0 == t.name).map(|i| i.1),
            rss_peak_kib: t.pid.map(|_| peak),
            ..Row::default()
        });
        eprintln!("(1) {} done", t.name);
    }

    // (2) one hop, gRPC unary at a fixed 1k rps on one connection: latency and CPU.
    let secs = if quick { 1 } else { 8 };
    let mut s2 = Vec::new();
    for t in &targets {
        let (mut p50, mut p99, mut p999, mut cpu, mut errors, mut ok_total) =
            (vec![], vec![], vec![], vec![], 0, 0);
        for _ in 0..reps {
            let before = cpu_of(t.pid);
            let (ok, err, a, b, c) = grpc_load(t.h2, 1000, secs)?;
            cpu.push((cpu_of(t.pid) - before) * 1e6 / (ok + err).max(1) as f64);
            p50.push(a);
            p99.push(b);
            p999.push(c);
            errors += err;
            ok_total += ok;
        }
        s2.push(Row {
            name: t.name.clone(),
            rps: ok_total as f64 / (reps as f64 * secs as f64),
            errors,
            cpu_us: t.pid.map(|_| median(cpu)),
            p50: Some(median(p50)),
            p99: Some(median(p99)),
            p999: Some(median(p999)),
            ..Row::default()
        });
        eprintln!("(2) {} done", t.name);
    }

    // (4) HTTP/1.1 keep-alive.
    let mut s4 = Vec::new();
    for t in &targets {
        let url = format!("http://127.0.0.1:{}/small", t.h1);
        h2load(&["--h1", "-n", &(n / 8).to_string(), "-c", "16", &url])?;
        let (mut rps, mut cpu, mut errors) = (Vec::new(), Vec::new(), 0);
        for _ in 0..reps {
            let before = cpu_of(t.pid);
            let (r, e, done) = h2load(&["--h1", "-n", &(n / 2).to_string(), "-c", "16", &url])?;
            cpu.push((cpu_of(t.pid) - before) * 1e6 / done.max(1) as f64);
            rps.push(r);
            errors += e;
        }
        s4.push(Row {
            name: t.name.clone(),
            rps: median(rps),
            errors,
            cpu_us: t.pid.map(|_| median(cpu)),
            ..Row::default()
        });
        eprintln!("(4) {} done", t.name);
    }

    // (5) memory: idle, and with 1,000 streams held open (each waits 1 s at the backend).
    let mut s5 = Vec::new();
    for t in targets.iter().filter(|t| t.pid.is_some()) {
        let url = format!("http://127.0.0.1:{}/slow", t.h2);
        let sampler = RssSampler::start(t.pid);
        let (_, errors, _) = h2load(&["-n", "1000", "-c", "10", "-m", "100", &url])?;
        let peak = sampler.stop();
        s5.push(Row {
            name: t.name.clone(),
            errors,
            rss_idle_kib: idle.iter().find(|i| i.0 == t.name).map(|i| i.1),
            rss_peak_kib: Some(peak),
            ..Row::default()
        });
    }

    // (3) two hops: remora client proxy → server proxy, plaintext and mTLS, over direct.
    let s3 = two_hops(&bin, backend, &tmp, secs, reps)?;

    let report = render(quick, reps, n, secs, &s1, &s2, &s3, &s4, &s5, &skipped);
    let out_dir = workspace().join("benches/results");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("report.md"), &report).map_err(|e| e.to_string())?;
    write_plots(&out_dir, &s1, &s2, &s5)?;
    println!("{report}");
    println!("written: {}", out_dir.join("report.md").display());
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn two_hops(
    bin: &str,
    backend: u16,
    tmp: &Path,
    secs: u64,
    reps: usize,
) -> Result<Vec<Row>, String> {
    let ca = tmp.join("ca");
    remora_certs::ca::init_dir(&ca, "cluster.local").map_err(|e| e.to_string())?;
    let issuer = remora_certs::ca::LoadedIssuer::from_dir(&ca).map_err(|e| e.to_string())?;
    let ident = |sa: &str| -> Result<(remora_certs::SpiffeId, PathBuf), String> {
        let id = remora_certs::SpiffeId::workload("cluster.local", "default", sa)
            .map_err(|e| e.to_string())?;
        let leaf = remora_certs::ca::issue_with_new_key(&issuer, &id, Duration::from_secs(3600))
            .map_err(|e| e.to_string())?;
        leaf.write(&tmp.join(sa)).map_err(|e| e.to_string())?;
        Ok((id, tmp.join(sa)))
    };
    let (web_id, web_dir) = ident("web")?;
    let (_, client_dir) = ident("client")?;
    let start =
        |app: u16, dests: Option<String>, id: Option<&Path>| -> Result<(Guard, u16, u16), String> {
            let (i, o, a) = (free_port(), free_port(), free_port());
            let mut env = crate::proxy_env(i, o, a, app);
            if let Some(d) = dests {
                env.push(("REMORA_DESTINATIONS", d));
            }
            if let Some(id) = id {
                env.push(("REMORA_IDENTITY_DIR", id.display().to_string()));
            }
            let g = spawn("0", bin, &[], &env)?;
            crate::wait_ready(a)?;
            Ok((g, i, o))
        };
    let (_server, s_in, _) = start(backend, None, Some(&web_dir))?;
    let (_plain, _, plain_out) = start(9, Some(format!("echo.test:80=127.0.0.1:{s_in}")), None)?;
    let (_mtls, _, mtls_out) = start(
        9,
        Some(format!("echo.test:80=127.0.0.1:{s_in}#{web_id}")),
        Some(&client_dir),
    )?;
    let mut rows = Vec::new();
    for (name, port) in [
        ("direct", backend),
        ("two remora hops, plaintext", plain_out),
        ("two remora hops, mTLS", mtls_out),
    ] {
        let (mut p50, mut p99, mut p999, mut errors) = (vec![], vec![], vec![], 0);
        for _ in 0..reps {
            let (_, e, a, b, c) = grpc_load(port, 1000, secs)?;
            p50.push(a);
            p99.push(b);
            p999.push(c);
            errors += e;
        }
        rows.push(Row {
            name: name.into(),
            errors,
            p50: Some(median(p50)),
            p99: Some(median(p99)),
            p999: Some(median(p999)),
            ..Row::default()
        });
    }
    Ok(rows)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn mib(v: Option<u64>) -> String {
    v.map(|k| format!("{:.1}", k as f64 / 1024.0))
        .unwrap_or_else(|| "–".into())
}

#[allow(clippy::too_many_arguments)]
fn render(
    quick: bool,
    reps: usize,
    n: u64,
    secs: u64,
    s1: &[Row],
    s2: &[Row],
    s3: &[Row],
    s4: &[Row],
    s5: &[Row],
    skipped: &[String],
) -> String {
    let mut o = String::new();
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "# remora side by side{}\n\n{date}, {} CPUs ({host}). `cargo run -p benches --release -- compare{}`. Medians of {reps} repetition(s).\n",
        if quick {
            " (quick mode: smoke test, not figures)"
        } else {
            ""
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        o,
        "Every proxy runs pinned to CPU 0 with one worker/thread; h2load, the gRPC generator and the backend (hyper, 128-byte responses) share CPU 1. CPU is the proxy process's own (utime+stime from /proc), per request; RSS from /proc/PID/status.\n\n{}",
        peers::SETTINGS
    );
    if !skipped.is_empty() {
        let _ = writeln!(o, "Skipped: {}\n", skipped.join("; "));
    }
    let base = |rows: &[Row], f: fn(&Row) -> Option<f64>, name: &str| {
        rows.iter().find(|r| r.name == name).and_then(f)
    };
    let _ = writeln!(
        o,
        "## (1) One hop, h2c, 128-byte responses, h2load -c 16 -m 10, {n} requests\n\n| proxy | rps | × direct | errors | CPU µs/request | CPU s per 1,000 requests | RSS idle MiB | RSS peak MiB |\n|---|---|---|---|---|---|---|---|"
    );
    let direct = s1
        .iter()
        .find(|r| r.name == "direct")
        .map(|r| r.rps)
        .unwrap_or(1.0);
    for r in s1 {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.2} | {} | {} | {} | {} | {} |",
            r.name,
            r.rps,
            r.rps / direct.max(1.0),
            r.errors,
            opt(r.cpu_us, 1),
            opt(r.cpu_us.map(|c| c / 1000.0), 4),
            mib(r.rss_idle_kib),
            mib(r.rss_peak_kib)
        );
    }
    let remora = base(s1, |r| r.cpu_us, "remora");
    for peer in ["Envoy", "nginx", "haproxy"] {
        if let (Some(a), Some(b)) = (remora, base(s1, |r| r.cpu_us, peer)) {
            let _ = writeln!(
                o,
                "\nremora CPU per request vs {peer}: {:.2}× ({a:.1} vs {b:.1} µs)",
                a / b
            );
        }
    }
    let _ = writeln!(o, "\n![CPU per request](cpu.svg) ![Max rps](rps.svg)\n");
    let _ = writeln!(
        o,
        "## (2) One hop, gRPC unary at 1,000 rps on one connection ({secs} s per repetition, open loop)\n\n| proxy | ok rps | errors | p50 µs | p99 µs | p99.9 µs | CPU µs/request |\n|---|---|---|---|---|---|---|"
    );
    for r in s2 {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            r.name,
            r.rps,
            r.errors,
            opt(r.p50, 0),
            opt(r.p99, 0),
            opt(r.p999, 0),
            opt(r.cpu_us, 1)
        );
    }
    let _ = writeln!(o, "\n![p99 at 1k rps](p99.svg)\n");
    let _ = writeln!(
        o,
        "## (3) Two hops (client proxy outbound → server proxy inbound), gRPC at 1,000 rps\n\n| path | errors | p50 µs | p99 µs | p99.9 µs | p99 over direct |\n|---|---|---|---|---|---|"
    );
    let d99 = s3.first().and_then(|r| r.p99).unwrap_or(0.0);
    for r in s3 {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | +{:.0} µs |",
            r.name,
            r.errors,
            opt(r.p50, 0),
            opt(r.p99, 0),
            opt(r.p999, 0),
            r.p99.unwrap_or(0.0) - d99
        );
    }
    let _ = writeln!(
        o,
        "\n## (4) HTTP/1.1 keep-alive, h2load --h1 -c 16\n\n| proxy | rps | errors | CPU µs/request |\n|---|---|---|---|"
    );
    for r in s4 {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {} | {} |",
            r.name,
            r.rps,
            r.errors,
            opt(r.cpu_us, 1)
        );
    }
    let _ = writeln!(
        o,
        "\n## (5) Memory: idle, and with 1,000 concurrent streams (h2load -c 10 -m 100 to a 1 s backend)\n\n| proxy | RSS idle MiB | RSS peak at 1,000 streams MiB | errors |\n|---|---|---|---|"
    );
    for r in s5 {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            r.name,
            mib(r.rss_idle_kib),
            mib(r.rss_peak_kib),
            r.errors
        );
    }
    let _ = writeln!(
        o,
        "\n![Memory](memory.svg)\n\n## (6) Balancing\n\n`cargo run -p benches --release -- balance` (uniform share, slow endpoint against Envoy's round robin, backend killed and added); its latest figures are in [benches/README.md](../README.md)."
    );
    o
}

/// The four bar charts next to report.md, drawn by `plot` (one bar per proxy, remora's
/// highlighted).
fn write_plots(dir: &Path, s1: &[Row], s2: &[Row], s5: &[Row]) -> Result<(), String> {
    let pick = |rows: &[Row], f: fn(&Row) -> Option<f64>| {
        rows.iter()
            .filter_map(|r| f(r).map(|v| (r.name.clone(), v)))
            .collect::<Vec<_>>()
    };
    let charts = [
        (
            "cpu.svg",
            "Proxy CPU per request, one hop h2c (lower is better)",
            "µs",
            pick(s1, |r| r.cpu_us),
        ),
        (
            "rps.svg",
            "Requests per second, one hop h2c, c16 m10",
            "rps",
            pick(s1, |r| Some(r.rps)),
        ),
        (
            "p99.svg",
            "p99 latency, gRPC at 1k rps (lower is better)",
            "µs",
            pick(s2, |r| r.p99),
        ),
        (
            "memory.svg",
            "Peak RSS with 1,000 concurrent streams (lower is better)",
            "MiB",
            pick(s5, |r| r.rss_peak_kib.map(|k| k as f64 / 1024.0)),
        ),
    ];
    for (file, title, unit, items) in charts {
        crate::plot::bars(&dir.join(file), title, unit, &items, "remora")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::{TempDir, well_formed};

    fn row(name: &str, rps: f64, cpu_us: Option<f64>, p99: Option<f64>, peak: Option<u64>) -> Row {
        Row {
            name: name.into(),
            rps,
            cpu_us,
            p99,
            rss_peak_kib: peak,
            ..Row::default()
        }
    }

    #[test]
    fn write_plots_draws_the_four_charts() {
        let dir = TempDir::new("compare");
        let s1 = [
            row("direct", 142814.0, None, None, None),
            row("remora", 86324.0, Some(11.1), None, Some(9216)),
            row("Envoy", 24349.0, Some(36.9), None, Some(69325)),
        ];
        let s2 = [
            row("direct", 1000.0, None, Some(310.0), None),
            row("remora", 1000.0, Some(20.0), Some(402.0), None),
        ];
        let s5 = [
            row("remora", 0.0, None, None, Some(9216)),
            row("Envoy", 0.0, None, None, Some(69325)),
        ];
        write_plots(&dir.0, &s1, &s2, &s5).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.0.join(f)).unwrap();
        // (file, title, bar labels): one bar per row that has the value.
        for (file, title, labels) in [
            (
                "cpu.svg",
                "Proxy CPU per request, one hop h2c (lower is better)",
                &["11.1 µs", "36.9 µs"][..],
            ),
            (
                "rps.svg",
                "Requests per second, one hop h2c, c16 m10",
                &["142814.0 rps", "86324.0 rps", "24349.0 rps"][..],
            ),
            (
                "p99.svg",
                "p99 latency, gRPC at 1k rps (lower is better)",
                &["310.0 µs", "402.0 µs"][..],
            ),
            (
                "memory.svg",
                "Peak RSS with 1,000 concurrent streams (lower is better)",
                &["9.0 MiB", "67.7 MiB"][..],
            ),
        ] {
            let svg = read(file);
            let svg = well_formed(&svg);
            assert!(svg.contains(title), "{file}: no title");
            for l in labels {
                assert!(svg.contains(&format!("{l}\n</text>")), "{file}: no {l}");
            }
            // remora's bar highlighted, every other bar muted.
            assert_eq!(svg.matches(r##"fill="#1F77B4""##).count(), 1, "{file}");
            assert_eq!(
                svg.matches(r##"fill="#9AA5B1""##).count(),
                labels.len() - 1,
                "{file}"
            );
        }
    }
}
