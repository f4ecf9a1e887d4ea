//! Side by side: remora, Envoy, nginx and haproxy against the same backend, on the same
//! machine, in the same run. Writes `benches/results/report.md` and SVG plots next to it.
//!
//! Method: each proxy pinned to CPU 0, the load generator and the backend to CPU 1; a warm-up
//! before counting; CPU from `/proc/PID/stat` of the proxy alone (CPU per request stays stable
//! even when the generator is the bottleneck); RSS from `/proc/PID/status`; medians of the
//! repetitions.
//!
//! Issue 16's figures: CPU per request and latency at a fixed 1,000 rps (open loop, `grpc-load`
//! in load.rs) over 1 and 10 connections, h2c and gRPC, every proxy, repetitions interleaved
//! across the proxies (forward, then backward...); the p50/p99/p99.9 each proxy adds over
//! direct; RSS with 10,000 idle HTTP/2 connections (`idle-conns` in load.rs) on a fresh
//! instance of each proxy; and a table of the issue's goals, met or with the gap.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::load::Kind;
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

/// One run of the open-loop generator: ok and failed requests counted after its warm-up,
/// latency percentiles (µs) of the ok ones, and every request it sent, the warm-up's included.
struct RateRun {
    ok: u64,
    errors: u64,
    p50: f64,
    p99: f64,
    p999: f64,
    sent: u64,
}

/// The open-loop generator (a child pinned to CPU 1): `rps` for `secs` seconds over `conns`
/// HTTP/2 connections, gRPC unary calls or h2c `GET /small`.
fn rate_load(port: u16, rps: u64, secs: u64, conns: usize, kind: Kind) -> Result<RateRun, String> {
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
            &conns.to_string(),
            match kind {
                Kind::Grpc => "grpc",
                Kind::H2c => "h2c",
            },
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match v.as_slice() {
        [ok, err, p50, p99, p999, sent] => Ok(RateRun {
            ok: *ok as u64,
            errors: *err as u64,
            p50: *p50,
            p99: *p99,
            p999: *p999,
            sent: *sent as u64,
        }),
        _ => Err(format!(
            "grpc-load printed {text:?} ({})",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// A load of the fixed-rate runs: what is sent, over how many connections.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Load {
    kind: Kind,
    conns: usize,
}

/// Issue 16's four loads at 1,000 rps, in the report's order.
const LOADS: [Load; 4] = [
    Load {
        kind: Kind::H2c,
        conns: 1,
    },
    Load {
        kind: Kind::H2c,
        conns: 10,
    },
    Load {
        kind: Kind::Grpc,
        conns: 1,
    },
    Load {
        kind: Kind::Grpc,
        conns: 10,
    },
];

impl Load {
    fn label(&self) -> String {
        let kind = match self.kind {
            Kind::H2c => "h2c",
            Kind::Grpc => "gRPC",
        };
        match self.conns {
            1 => format!("{kind}, 1 connection"),
            n => format!("{kind}, {n} connections"),
        }
    }
}

/// The rows of one load at 1,000 rps, direct first.
type AtLoad = (Load, Vec<Row>);

/// The proxies compare runs, in the report's order.
const PROXIES: [&str; 4] = ["remora", "Envoy", "nginx", "haproxy"];

/// Starts one of [`PROXIES`] in front of `backend`; `max_conns`: nginx's worker_connections and
/// haproxy's maxconn when not their defaults.
fn start_proxy(
    name: &str,
    bin: &str,
    tmp: &Path,
    backend: u16,
    max_conns: Option<u32>,
) -> Result<Peer, String> {
    match name {
        "remora" => peers::remora(bin, backend),
        "Envoy" => peers::envoy(tmp, &[backend]),
        "nginx" => peers::nginx(tmp, backend, max_conns),
        "haproxy" => peers::haproxy(tmp, backend, max_conns),
        other => Err(format!("no proxy called {other}")),
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
    for name in PROXIES {
        match start_proxy(name, &bin, &tmp, backend, None) {
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

    // (2) and (6)-(7): every target at a fixed 1,000 rps, h2c and gRPC, over 1 and 10
    // connections: CPU per request and latency. (2) is the gRPC, one-connection load.
    let secs = if quick { 1 } else { 8 };
    let at_1k = at_1k(&targets, secs, reps)?;
    let s2 = at_1k
        .iter()
        .find(|(l, _)| l.kind == Kind::Grpc && l.conns == 1)
        .map(|(_, rows)| rows.clone())
        .unwrap_or_default();

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

    // (8) idle HTTP/2 connections: RSS of a fresh instance of each proxy holding them.
    let started: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let idle_n = if quick { 1_000 } else { 10_000 };
    let (s8, idle_limit) = idle_connections(&bin, backend, &tmp, &started, idle_n, quick)?;
    // The proxies of (1)-(7) are not needed any more.
    drop(targets);

    // (3) two hops: remora client proxy → server proxy, plaintext and mTLS, over direct;
    // two haproxy hops for reference; the server proxy's handshake cost.
    let (s3, hs) = two_hops(&bin, backend, &tmp, secs, reps, quick)?;

    // (9) REMORA_THREADS=2 over both CPUs against one thread on CPU 0.
    let s9 = threads(&bin, backend, n, reps)?;

    let results = Results {
        quick,
        reps,
        n,
        secs,
        s1,
        s2,
        s3,
        s4,
        s5,
        s9,
        hs,
        at_1k,
        idle: s8,
        idle_limit,
        skipped,
        layout: crate::layout::check(&workspace(), Path::new(&bin)),
    };
    let report = render(&results);
    let out_dir = workspace().join("benches/results");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("report.md"), &report).map_err(|e| e.to_string())?;
    write_plots(
        &out_dir,
        &results.s1,
        &results.s2,
        &results.s5,
        &results.at_1k,
        &results.idle,
    )?;
    println!("{report}");
    println!("written: {}", out_dir.join("report.md").display());
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Every target at 1,000 rps under each of [`LOADS`], `reps` times, the repetitions
/// interleaved: in each repetition every load runs once on every target, the targets forward
/// in even repetitions and backward in odd ones, so drift on a shared machine lands on all of
/// them alike. CPU per request divides the proxy's CPU over the whole run by every request
/// sent, the warm-up's included. Medians per load and target.
fn at_1k(targets: &[Target], secs: u64, reps: usize) -> Result<Vec<AtLoad>, String> {
    #[derive(Clone, Default)]
    struct Samples {
        cpu: Vec<f64>,
        p50: Vec<f64>,
        p99: Vec<f64>,
        p999: Vec<f64>,
        ok: u64,
        errors: u64,
    }
    let k = targets.len();
    let mut samples = vec![vec![Samples::default(); k]; LOADS.len()];
    for rep in 0..reps {
        for (l, load) in LOADS.iter().enumerate() {
            for j in 0..k {
                let i = if rep % 2 == 0 { j } else { k - 1 - j };
                let t = &targets[i];
                let before = cpu_of(t.pid);
                let r = rate_load(t.h2, 1000, secs, load.conns, load.kind)?;
                let s = &mut samples[l][i];
                s.cpu
                    .push((cpu_of(t.pid) - before) * 1e6 / r.sent.max(1) as f64);
                s.p50.push(r.p50);
                s.p99.push(r.p99);
                s.p999.push(r.p999);
                s.ok += r.ok;
                s.errors += r.errors;
            }
        }
        eprintln!("(2, 6, 7) at 1k rps: repetition {} of {reps} done", rep + 1);
    }
    Ok(LOADS
        .iter()
        .zip(samples)
        .map(|(load, per_target)| {
            let rows = targets
                .iter()
                .zip(per_target)
                .map(|(t, s)| Row {
                    name: t.name.clone(),
                    rps: s.ok as f64 / (reps as f64 * secs as f64),
                    errors: s.errors,
                    cpu_us: t.pid.map(|_| median(s.cpu)),
                    p50: Some(median(s.p50)),
                    p99: Some(median(s.p99)),
                    p999: Some(median(s.p999)),
                    ..Row::default()
                })
                .collect();
            (*load, rows)
        })
        .collect())
}

/// One proxy holding idle HTTP/2 connections.
#[derive(Clone, Debug, Default)]
struct IdleRow {
    name: String,
    /// The connections asked for, opened, and still open when RSS had been read.
    wanted: usize,
    opened: usize,
    held: usize,
    /// RSS after one warm-up request, before the idle connections.
    rss_before_kib: u64,
    /// RSS with the idle connections open (the largest of a few samples).
    rss_kib: u64,
}

impl IdleRow {
    /// (RSS with them − RSS before) / connections opened.
    fn bytes_per_conn(&self) -> Option<f64> {
        (self.opened > 0).then(|| {
            (self.rss_kib as f64 - self.rss_before_kib as f64) * 1024.0 / self.opened as f64
        })
    }
}

/// The descriptor limit the harness had before [`raise_nofile`]; restored on drop, so the
/// scenarios after this one start their processes as before.
struct NofileRestore(Option<libc::rlimit>);

impl Drop for NofileRestore {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // SAFETY: a plain syscall on a local struct.
            unsafe {
                libc::setrlimit(libc::RLIMIT_NOFILE, &old);
            }
        }
    }
}

/// Raises this process's descriptor limit to at least `want` (the hard limit too, which needs
/// root; otherwise the soft limit up to the hard one), for the children started next. Returns
/// the guard restoring the old limit and the soft limit now in force.
fn raise_nofile(want: u64) -> (NofileRestore, u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on local structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) != 0 {
            return (NofileRestore(None), 0);
        }
        let want = want as libc::rlim_t;
        let up = libc::rlimit {
            rlim_cur: want.max(old.rlim_cur),
            rlim_max: want.max(old.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 {
            return (NofileRestore(Some(old)), up.rlim_cur);
        }
        let soft = libc::rlimit {
            rlim_cur: old.rlim_max,
            rlim_max: old.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return (NofileRestore(Some(old)), soft.rlim_cur);
        }
        (NofileRestore(None), old.rlim_cur)
    }
}

/// The descriptor limit the idle-connection instances get: remora takes a quarter of it per
/// listener (each proxied connection holds two descriptors), so four times the connections
/// with room to spare.
fn idle_nofile(n: usize) -> u64 {
    (4 * n as u64 + 8192).max(65_536)
}

/// (8) For each proxy in `names`: a fresh instance (nginx's worker_connections and haproxy's
/// maxconn `n` + 1,024, the descriptor limit raised first), one warm-up request, RSS; then `n`
/// HTTP/2 connections opened by the `idle-conns` helper on CPU 1 (each through the SETTINGS
/// exchange and one request) and held idle; RSS again after they settle. Also returns the
/// descriptor limit the instances got.
fn idle_connections(
    bin: &str,
    backend: u16,
    tmp: &Path,
    names: &[&str],
    n: usize,
    quick: bool,
) -> Result<(Vec<IdleRow>, u64), String> {
    use std::io::{BufRead, BufReader, Write};
    let (_restore, limit) = raise_nofile(idle_nofile(n));
    if limit < idle_nofile(n) {
        eprintln!(
            "benches: (8) descriptor limit {limit}, not {}: the hard limit cannot be raised here (CAP_SYS_RESOURCE); remora takes (limit - 128) / 4 = {} connections per listener",
            idle_nofile(n),
            remora_max_conns(limit)
        );
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for name in PROXIES.iter().filter(|p| names.contains(p)) {
        let peer = match start_proxy(name, bin, tmp, backend, Some(n as u32 + 1024)) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("benches: (8) skipping {name}: {e}");
                continue;
            }
        };
        let pid = peer.pid();
        // One request first, so the upstream connection and whatever else the first request
        // sets up is in the "before" figure, not in the per-connection one.
        let url = format!("http://127.0.0.1:{}/small", peer.h2);
        h2load(&["-n", "10", "-c", "1", &url])?;
        std::thread::sleep(Duration::from_millis(300));
        let rss_before_kib = rss_kib(pid);
        let mut helper = Command::new("taskset")
            .args(["-c", "1"])
            .arg(&me)
            .args([
                "idle-conns",
                &format!("127.0.0.1:{}", peer.h2),
                "echo.test:80",
                &n.to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("idle-conns: {e}"))?;
        let mut out = BufReader::new(helper.stdout.take().ok_or("idle-conns: no stdout")?);
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let opened = line
            .strip_prefix("opened ")
            .and_then(|r| r.split_whitespace().next()?.parse().ok());
        let Some(opened) = opened else {
            let _ = helper.kill();
            let _ = helper.wait();
            return Err(format!("idle-conns printed {line:?} against {name}"));
        };
        // Let the proxy settle (lazy frees, deferred work), then the largest of a few samples.
        std::thread::sleep(Duration::from_millis(if quick { 300 } else { 1000 }));
        let mut rss = 0;
        for _ in 0..5 {
            rss = rss.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut stdin) = helper.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        line.clear();
        let _ = out.read_line(&mut line);
        let held = line
            .strip_prefix("held ")
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or(0);
        let _ = helper.wait();
        rows.push(IdleRow {
            name: name.to_string(),
            wanted: n,
            opened,
            held,
            rss_before_kib,
            rss_kib: rss,
        });
        drop(peer);
        eprintln!("(8) {name} done: {opened} opened, {held} held");
    }
    Ok((rows, limit))
}

/// remora's connection limit per listener at a descriptor limit (proxy/src/config.rs,
/// `derived_max_connections`).
fn remora_max_conns(limit: u64) -> u64 {
    (limit.saturating_sub(128) / 4).clamp(16, 100_000)
}

fn two_hops(
    bin: &str,
    backend: u16,
    tmp: &Path,
    secs: u64,
    reps: usize,
    quick: bool,
) -> Result<(Vec<Row>, Option<crate::mtls::Handshakes>), String> {
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
    // Twice at most: a port found free can be taken by another socket (an outgoing
    // connection's ephemeral port) before the proxy binds it.
    let start =
        |app: u16, dests: Option<String>, id: Option<&Path>| -> Result<(Guard, u16, u16), String> {
            let mut failed = String::new();
            for attempt in 1..=2 {
                let (i, o, a) = (free_port(), free_port(), free_port());
                let mut env = crate::proxy_env(i, o, a, app);
                if let Some(d) = &dests {
                    env.push(("REMORA_DESTINATIONS", d.clone()));
                }
                if let Some(id) = id {
                    env.push(("REMORA_IDENTITY_DIR", id.display().to_string()));
                }
                let log = tmp.join(format!("two-hops-proxy-{a}.log"));
                let mut g = crate::spawn_logged("0", bin, &env, &log)?;
                match crate::wait_ready_logged(&mut g, a, &log) {
                    Ok(()) => return Ok((g, i, o)),
                    Err(e) => {
                        eprintln!("benches: (3) attempt {attempt} of 2: {e}");
                        failed = e;
                    }
                }
            }
            Err(failed)
        };
    let (server, s_in, _) = start(backend, None, Some(&web_dir))?;
    let (plain, _, plain_out) = start(9, Some(format!("echo.test:80=127.0.0.1:{s_in}")), None)?;
    let (mtls, _, mtls_out) = start(
        9,
        Some(format!("echo.test:80=127.0.0.1:{s_in}#{web_id}")),
        Some(&client_dir),
    )?;
    // The same two hops with haproxy (h2c both ways, both pinned to CPU 0 like the remora
    // pair): what two proxies cost at all in this layout, where they share one CPU.
    let ha = peers::haproxy(tmp, backend, None).and_then(|inner| {
        let outer = peers::haproxy(tmp, inner.h2, None)?;
        Ok((inner, outer))
    });
    let ha = match ha {
        Ok(pair) => Some(pair),
        Err(e) => {
            eprintln!("benches: no haproxy pair for (3): {e}");
            None
        }
    };
    let mut paths = vec![
        ("direct", backend, vec![]),
        (
            "two remora hops, plaintext",
            plain_out,
            vec![plain.0.id(), server.0.id()],
        ),
        (
            "two remora hops, mTLS",
            mtls_out,
            vec![mtls.0.id(), server.0.id()],
        ),
    ];
    if let Some((inner, outer)) = &ha {
        paths.push((
            "two haproxy hops, plaintext (reference)",
            outer.h2,
            vec![outer.pid(), inner.pid()],
        ));
    }
    // Per path: p50, p99, p99.9, CPU per request, errors. The paths take turns within each
    // repetition, forward in even ones and backward in odd ones (as in (6)): mTLS's cost over
    // plaintext is a small difference of two large figures, and drift on a shared machine
    // between one path's runs and the next's would land in it.
    type Runs = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, u64);
    let mut runs: Vec<Runs> = paths.iter().map(|_| Runs::default()).collect();
    for rep in 0..reps {
        let mut order: Vec<usize> = (0..paths.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (_, port, pids) = &paths[i];
            let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            let r = rate_load(*port, 1000, secs, 1, Kind::Grpc)?;
            let used: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - before;
            let (p50, p99, p999, cpu, errors) = &mut runs[i];
            cpu.push(used * 1e6 / r.sent.max(1) as f64);
            p50.push(r.p50);
            p99.push(r.p99);
            p999.push(r.p999);
            *errors += r.errors;
        }
    }
    let mut rows = Vec::new();
    for ((name, _, pids), (p50, p99, p999, cpu, errors)) in paths.into_iter().zip(runs) {
        rows.push(Row {
            name: name.into(),
            errors,
            cpu_us: (!pids.is_empty()).then(|| median(cpu)),
            p50: Some(median(p50)),
            p99: Some(median(p99)),
            p999: Some(median(p999)),
            ..Row::default()
        });
    }
    drop(ha);
    let window = Duration::from_secs(if quick { 1 } else { 5 });
    let hs = match crate::mtls::handshakes(server.0.id(), s_in, &client_dir, &web_id, window) {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("benches: handshake cost not measured: {e}");
            None
        }
    };
    Ok((rows, hs))
}

/// Saturated h2c through remora with one thread pinned to CPU 0, then with
/// `REMORA_THREADS=2` on CPUs 0 and 1 (h2load stays on CPU 1 in both, so the second proxy
/// thread shares its CPU with the generator and the backend).
fn threads(bin: &str, backend: u16, n: u64, reps: usize) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (name, threads, cpus) in [
        ("remora, 1 thread on CPU 0", "1", "0"),
        ("remora, REMORA_THREADS=2 on CPUs 0-1", "2", "0,1"),
    ] {
        let (i, o, a) = (free_port(), free_port(), free_port());
        let mut env = crate::proxy_env(i, o, a, backend);
        env.push(("REMORA_THREADS", threads.into()));
        let guard = spawn(cpus, bin, &[], &env)?;
        crate::wait_ready(a)?;
        let pid = guard.0.id();
        let url = format!("http://127.0.0.1:{i}/small");
        h2load(&["-n", &(n / 4).to_string(), "-c", "16", "-m", "10", &url])?;
        let (mut rps, mut cpu, mut errors) = (Vec::new(), Vec::new(), 0);
        for _ in 0..reps {
            let before = cpu_seconds(pid);
            let (r, e, done) = h2load(&["-n", &n.to_string(), "-c", "16", "-m", "10", &url])?;
            cpu.push((cpu_seconds(pid) - before) * 1e6 / done.max(1) as f64);
            rps.push(r);
            errors += e;
        }
        rows.push(Row {
            name: name.into(),
            rps: median(rps),
            errors,
            cpu_us: Some(median(cpu)),
            ..Row::default()
        });
        eprintln!("(9) {name} done");
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

/// Everything one `compare` run measured, for the report and the plots.
struct Results {
    quick: bool,
    reps: usize,
    n: u64,
    secs: u64,
    s1: Vec<Row>,
    s2: Vec<Row>,
    s3: Vec<Row>,
    s4: Vec<Row>,
    s5: Vec<Row>,
    /// Saturated h2c with one thread on CPU 0 and with `REMORA_THREADS=2` on both CPUs.
    s9: Vec<Row>,
    /// The server proxy's handshake cost, when it could be measured.
    hs: Option<crate::mtls::Handshakes>,
    at_1k: Vec<AtLoad>,
    idle: Vec<IdleRow>,
    /// The descriptor limit the idle-connection instances ran with.
    idle_limit: u64,
    skipped: Vec<String>,
    /// How much of remora-proxy's text layout the measured binary still follows.
    layout: Result<crate::layout::Coverage, String>,
}

/// The row called `name`.
fn find<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.name == name)
}

/// `f` of `name`'s row minus `f` of direct's: what the proxy adds.
fn over_direct(rows: &[Row], name: &str, f: fn(&Row) -> Option<f64>) -> Option<f64> {
    Some(find(rows, name).and_then(f)? - find(rows, "direct").and_then(f)?)
}

fn signed(v: Option<f64>) -> String {
    v.map(|x| format!("{x:+.0}")).unwrap_or_else(|| "–".into())
}

/// The issue's goals as table rows: `| goal | remora | haproxy | nginx | verdict |`.
fn goals(r: &Results) -> Vec<[String; 5]> {
    let mut rows = Vec::new();
    let peers = ["haproxy", "nginx"];
    // CPU per request at 1,000 rps: ≤ 0.8× haproxy's and nginx's, each load.
    for (load, at) in &r.at_1k {
        let cpu = |name: &str| find(at, name).and_then(|r| r.cpu_us);
        let remora = cpu("remora");
        let cell = |name: &str| match (cpu(name), remora) {
            (Some(p), Some(m)) => format!("{p:.1} µs (remora {:.2}×)", m / p),
            (Some(p), None) => format!("{p:.1} µs"),
            _ => "–".into(),
        };
        let limit = peers
            .iter()
            .filter_map(|p| cpu(p))
            .map(|p| 0.8 * p)
            .fold(f64::INFINITY, f64::min);
        let verdict = match remora {
            Some(m) if limit.is_finite() && m <= limit => "✓".to_string(),
            Some(m) if limit.is_finite() => {
                format!(
                    "✗ needs ≤ {limit:.1} µs ({:+.0} %)",
                    (limit / m - 1.0) * 100.0
                )
            }
            _ => "– (not measured)".into(),
        };
        rows.push([
            format!(
                "CPU/request at 1,000 rps, {} ≤ 0.8× haproxy's and nginx's",
                load.label()
            ),
            remora
                .map(|m| format!("{m:.1} µs"))
                .unwrap_or_else(|| "–".into()),
            cell("haproxy"),
            cell("nginx"),
            verdict,
        ]);
    }
    // Latency added over direct at 1,000 rps: p50 and p99 ≤ haproxy's.
    for (load, at) in &r.at_1k {
        let add = |name: &str| {
            (
                over_direct(at, name, |r| r.p50),
                over_direct(at, name, |r| r.p99),
            )
        };
        let show = |(a, b): (Option<f64>, Option<f64>)| match (a, b) {
            (Some(_), Some(_)) => format!("{} / {} µs", signed(a), signed(b)),
            _ => "–".into(),
        };
        let (m, h) = (add("remora"), add("haproxy"));
        let verdict = match (m, h) {
            ((Some(m50), Some(m99)), (Some(h50), Some(h99))) => {
                let mut gaps = Vec::new();
                if m50 > h50 {
                    gaps.push(format!("p50 {:+.0} µs", m50 - h50));
                }
                if m99 > h99 {
                    gaps.push(format!("p99 {:+.0} µs", m99 - h99));
                }
                match gaps.is_empty() {
                    true => "✓".to_string(),
                    false => format!("✗ over haproxy's: {}", gaps.join(", ")),
                }
            }
            _ => "– (haproxy not measured)".into(),
        };
        rows.push([
            format!(
                "p50 / p99 added over direct at 1,000 rps, {} ≤ haproxy's",
                load.label()
            ),
            show(m),
            show(h),
            show(add("nginx")),
            verdict,
        ]);
    }
    // Memory.
    let mem = |rows: &[Row], name: &str, f: fn(&Row) -> Option<u64>| {
        find(rows, name).and_then(f).map(|k| k as f64 / 1024.0)
    };
    let at_most = |v: Option<f64>, limit: f64, unit: &str| match v {
        Some(v) if v <= limit => "✓".to_string(),
        Some(v) => format!("✗ {:+.1} {unit} over", v - limit),
        None => "– (not measured)".into(),
    };
    let mib_of = |v: Option<f64>| {
        v.map(|v| format!("{v:.1} MiB"))
            .unwrap_or_else(|| "–".into())
    };
    let idle = |name: &str| mem(&r.s1, name, |r| r.rss_idle_kib);
    rows.push([
        "Idle RSS ≤ 5 MiB".into(),
        mib_of(idle("remora")),
        mib_of(idle("haproxy")),
        mib_of(idle("nginx")),
        at_most(idle("remora"), 5.0, "MiB"),
    ]);
    let streams = |name: &str| mem(&r.s5, name, |r| r.rss_peak_kib);
    rows.push([
        "RSS with 1,000 concurrent streams ≤ 12 MiB".into(),
        mib_of(streams("remora")),
        mib_of(streams("haproxy")),
        mib_of(streams("nginx")),
        at_most(streams("remora"), 12.0, "MiB"),
    ]);
    let per_conn = |name: &str| {
        r.idle.iter().find(|i| i.name == name).map(|i| {
            format!(
                "{} ({} of {} held)",
                kib(i.bytes_per_conn()),
                thousands(i.held as u64),
                thousands(i.wanted as u64)
            )
        })
    };
    let wanted = thousands(r.idle.first().map(|i| i.wanted).unwrap_or(0) as u64);
    rows.push([
        format!("Bytes per idle HTTP/2 connection, {wanted} connections: bounded"),
        per_conn("remora").unwrap_or_else(|| "–".into()),
        per_conn("haproxy").unwrap_or_else(|| "–".into()),
        per_conn("nginx").unwrap_or_else(|| "–".into()),
        "reported (no threshold)".into(),
    ]);
    // Saturated: CPU per request ≤ haproxy's, h2c and HTTP/1.1; max rps ≥ 0.85× direct.
    for (goal, rows_of) in [
        ("CPU/request saturated, one hop h2c ≤ haproxy's", &r.s1),
        (
            "CPU/request saturated, HTTP/1.1 keep-alive ≤ haproxy's",
            &r.s4,
        ),
    ] {
        let cpu = |name: &str| find(rows_of, name).and_then(|r| r.cpu_us);
        let (m, h) = (cpu("remora"), cpu("haproxy"));
        let us = |v: Option<f64>| {
            v.map(|v| format!("{v:.1} µs"))
                .unwrap_or_else(|| "–".into())
        };
        let verdict = match (m, h) {
            (Some(m), Some(h)) if m <= h => "✓".to_string(),
            (Some(m), Some(h)) => format!("✗ {:.2}× haproxy's", m / h),
            _ => "– (not measured)".into(),
        };
        rows.push([goal.into(), us(m), us(h), us(cpu("nginx")), verdict]);
    }
    let direct = find(&r.s1, "direct").map(|d| d.rps).unwrap_or(0.0);
    let share = |name: &str| {
        find(&r.s1, name)
            .filter(|_| direct > 0.0)
            .map(|x| x.rps / direct)
    };
    let times = |v: Option<f64>| {
        v.map(|v| format!("{v:.2}× direct"))
            .unwrap_or_else(|| "–".into())
    };
    rows.push([
        "Max rps, one thread, h2c ≥ 0.85× direct (where the generator allows)".into(),
        times(share("remora")),
        times(share("haproxy")),
        times(share("nginx")),
        match share("remora") {
            Some(x) if x >= 0.85 => "✓".into(),
            Some(x) => format!("✗ needs {:+.0} % rps", (0.85 / x - 1.0) * 100.0),
            None => "– (not measured)".into(),
        },
    ]);
    let mtls =
        r.s3.iter()
            .find(|x| x.name.contains("mTLS"))
            .and_then(|x| Some(x.p99? - r.s3.first()?.p99?));
    rows.push([
        "Two remora hops with mTLS: p99 over direct ≤ 150 µs".into(),
        mtls.map(|v| format!("{v:+.0} µs"))
            .unwrap_or_else(|| "–".into()),
        "–".into(),
        "–".into(),
        within_us(mtls, 150.0),
    ]);
    let ha2 =
        r.s3.iter()
            .find(|x| x.name.starts_with("two haproxy hops"))
            .and_then(|x| Some(x.p99? - r.s3.first()?.p99?));
    if let Some(v) = ha2 {
        rows.push([
            "(reference) Two haproxy hops, plaintext: p99 over direct".into(),
            "–".into(),
            format!("{v:+.0} µs"),
            "–".into(),
            "reported (the floor of this layout)".into(),
        ]);
    }
    let resumed = r.hs.as_ref().map(|h| h.resumed_us - h.plain_us);
    rows.push([
        "mTLS handshake with session resumption (server CPU over a plaintext connection) ≤ 200 µs"
            .into(),
        r.hs.as_ref()
            .map(|h| {
                format!(
                    "{:.0} µs (full: {:.0} µs)",
                    h.resumed_us - h.plain_us,
                    h.full_us - h.plain_us
                )
            })
            .unwrap_or_else(|| "–".into()),
        "–".into(),
        "–".into(),
        within_us(resumed, 200.0),
    ]);
    let over = mtls_overhead(&r.s3);
    rows.push([
        "mTLS CPU per request over plaintext (two hops, 1,000 rps) ≤ 10 %".into(),
        over.map(|x| format!("{:+.1} %", x * 100.0))
            .unwrap_or_else(|| "–".into()),
        "–".into(),
        "–".into(),
        match over {
            Some(x) if x <= 0.10 => "✓".into(),
            Some(x) => format!("✗ {:+.1} points over", (x - 0.10) * 100.0),
            None => "– (not measured)".into(),
        },
    ]);
    if let [one, two] = r.s9.as_slice()
        && let (Some(a), Some(b)) = (one.cpu_us, two.cpu_us)
    {
        rows.push([
            "REMORA_THREADS=2: ≥ 1.8× one thread's rps (needs free CPUs)".into(),
            format!(
                "{:.2}× rps; {:.2}× CPU/request",
                two.rps / one.rps.max(1.0),
                b / a
            ),
            "–".into(),
            "–".into(),
            "not measurable on 2 CPUs, see (9)".into(),
        ]);
    }
    rows
}

/// The verdict on a figure in µs that must stay at or under `limit`.
fn within_us(v: Option<f64>, limit: f64) -> String {
    match v {
        Some(v) if v <= limit => "✓".into(),
        Some(v) => format!("✗ {:+.0} µs over", v - limit),
        None => "– (not measured)".into(),
    }
}

/// `n` with a comma between thousands, as the report writes counts: 10,000.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn kib(bytes: Option<f64>) -> String {
    bytes
        .map(|b| format!("{:.1} KiB", b / 1024.0))
        .unwrap_or_else(|| "–".into())
}

fn render(r: &Results) -> String {
    let (quick, reps, n, secs) = (r.quick, r.reps, r.n, r.secs);
    let (s1, s2, s3, s4, s5) = (&r.s1, &r.s2, &r.s3, &r.s4, &r.s5);
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
    if !r.skipped.is_empty() {
        let _ = writeln!(o, "Skipped: {}\n", r.skipped.join("; "));
    }
    let _ = match &r.layout {
        Ok(c) => writeln!(o, "{}\n", c.describe()),
        Err(e) => writeln!(o, "Text layout: not checked ({e}).\n"),
    };
    let _ = writeln!(
        o,
        "## Goals (issue 16), this run\n\nRatios within this run; absolute figures move between runs on a shared machine. Sections (6)–(8) and the sections they cite hold the figures.\n\n| goal | remora | haproxy | nginx | met? |\n|---|---|---|---|---|"
    );
    for g in goals(r) {
        let _ = writeln!(o, "| {} |", g.join(" | "));
    }
    let _ = writeln!(
        o,
        "\nTwo threads cannot show ≥ 1.8× rps on this two-CPU machine, where the generator needs a CPU; (9) reports what can be measured.\n"
    );
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
        "## (2) One hop, gRPC unary at 1,000 rps on one connection ({secs} s per repetition, open loop)\n\nThe gRPC, one-connection runs of (6); CPU per request counts every request sent, the half-second warm-up's included.\n\n| proxy | ok rps | errors | p50 µs | p99 µs | p99.9 µs | CPU µs/request |\n|---|---|---|---|---|---|---|"
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
        "## (3) Two hops (client proxy outbound → server proxy inbound), gRPC at 1,000 rps\n\nBoth proxies of a pair are pinned to CPU 0, the generator and the backend to CPU 1. CPU is both proxies' together, per request sent. In each repetition every path runs once, in turn, forward and then backward.\n\n| path | errors | p50 µs | p99 µs | p99.9 µs | p99 over direct | CPU µs/request, both proxies |\n|---|---|---|---|---|---|---|"
    );
    let d99 = s3.first().and_then(|r| r.p99).unwrap_or(0.0);
    for r in s3 {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | +{:.0} µs | {} |",
            r.name,
            r.errors,
            opt(r.p50, 0),
            opt(r.p99, 0),
            opt(r.p999, 0),
            r.p99.unwrap_or(0.0) - d99,
            opt(r.cpu_us, 1)
        );
    }
    if let Some(x) = mtls_overhead(s3) {
        let _ = writeln!(
            o,
            "\nmTLS over plaintext between the two proxies: {:+.1} % CPU per request.",
            x * 100.0
        );
    }
    if let Some(h) = &r.hs {
        let _ = writeln!(
            o,
            "\n**Handshakes into the server proxy's inbound** (`mtls::handshakes`): fresh TCP connections, each with one HTTP/1.1 request, from one loop. The server proxy's CPU per connection: {:.0} µs in plaintext; {:.0} µs with a full TLS 1.3 mTLS handshake ({:.0} connections/s); {:.0} µs resuming the session the previous connection received ({:.0}/s; {} of {} resumed), as a client proxy does with its per-peer configuration. The handshake's own part, over plaintext: {:.0} µs full, {:.0} µs resumed.",
            h.plain_us,
            h.full_us,
            h.full_per_s,
            h.resumed_us,
            h.resumed_per_s,
            thousands(h.resumed),
            thousands(h.resumed_of),
            h.full_us - h.plain_us,
            h.resumed_us - h.plain_us
        );
    }
    let _ = writeln!(
        o,
        "\n## (4) HTTP/1.1 keep-alive, h2load --h1 -c 16\n\n| proxy | rps | errors | CPU µs/request |\n|---|---|---|---|"
    );
    rps_rows(&mut o, s4);
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
    let _ = writeln!(o, "\n![Memory](memory.svg)\n");
    render_at_1k(&mut o, r);
    render_idle(&mut o, &r.idle, r.idle_limit);
    render_threads(&mut o, &r.s9);
    let _ = writeln!(
        o,
        "## (10) Balancing\n\n`cargo run -p benches --release -- balance` (uniform share, slow endpoint against Envoy's round robin, backend killed and added); its latest figures are in [benches/README.md](../README.md)."
    );
    o
}

/// Rows of a `| proxy | rps | errors | CPU µs/request |` table.
fn rps_rows(o: &mut String, rows: &[Row]) {
    for r in rows {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {} | {} |",
            r.name,
            r.rps,
            r.errors,
            opt(r.cpu_us, 1)
        );
    }
}

/// Section (9): one thread against two.
fn render_threads(o: &mut String, s9: &[Row]) {
    let _ = writeln!(
        o,
        "## (9) Two threads: `REMORA_THREADS=2` on both CPUs against one thread on CPU 0\n\nSaturated h2c as in (1). This machine has two CPUs and h2load and the backend need one, so the second thread shares CPU 1 with them: rps cannot double here. CPU per request is what tells whether a second thread costs extra work per request (locks, cross-thread wake-ups).\n\n| proxy | rps | errors | CPU µs/request |\n|---|---|---|---|"
    );
    rps_rows(o, s9);
    if let [one, two] = s9
        && let (Some(a), Some(b)) = (one.cpu_us, two.cpu_us)
    {
        let _ = writeln!(
            o,
            "\nrps {:.2}× one thread's; CPU per request {:.2}× one thread's.\n",
            two.rps / one.rps.max(1.0),
            b / a
        );
    }
}

/// mTLS's extra CPU per request over plaintext between the two proxies, as a fraction.
fn mtls_overhead(s3: &[Row]) -> Option<f64> {
    let plain = s3
        .iter()
        .find(|r| r.name == "two remora hops, plaintext")?
        .cpu_us?;
    let mtls = s3
        .iter()
        .find(|r| r.name == "two remora hops, mTLS")?
        .cpu_us?;
    Some(mtls / plain - 1.0)
}

/// Sections (6) and (7): CPU per request and latency at 1,000 rps under each load.
fn render_at_1k(o: &mut String, r: &Results) {
    let secs = r.secs;
    let _ = writeln!(
        o,
        "## (6) CPU per request at 1,000 rps, h2c and gRPC, over 1 and 10 connections\n\nThe open-loop generator (`grpc-load` in load.rs) on CPU 1 sends 1,000 requests a second for {secs} s after a half-second warm-up, round robin over the connections: h2c `GET /small` (128-byte answers) or gRPC unary calls (64-byte messages echoed). CPU per request is the proxy's CPU over the whole run divided by every request sent, the warm-up's included. In each repetition every load runs once on every proxy, the proxies in turn, forward and then backward, so drift lands on all of them alike.\n"
    );
    let _ = write!(o, "| proxy |");
    for (load, _) in &r.at_1k {
        let _ = write!(o, " {} µs |", load.label());
    }
    let _ = writeln!(o, "\n|---|{}", "---|".repeat(r.at_1k.len()));
    let names: Vec<String> = r
        .at_1k
        .first()
        .map(|(_, rows)| {
            rows.iter()
                .filter(|x| x.cpu_us.is_some())
                .map(|x| x.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let cpu = |rows: &[Row], name: &str| find(rows, name).and_then(|x| x.cpu_us);
    for name in &names {
        let _ = write!(o, "| {name} |");
        for (_, rows) in &r.at_1k {
            let _ = write!(o, " {} |", opt(cpu(rows, name), 1));
        }
        let _ = writeln!(o);
    }
    for peer in ["haproxy", "nginx"] {
        if !names.iter().any(|n| n == peer) || !names.iter().any(|n| n == "remora") {
            continue;
        }
        let _ = write!(o, "| **remora ÷ {peer}** (goal ≤ 0.80) |");
        for (_, rows) in &r.at_1k {
            let ratio = cpu(rows, "remora").zip(cpu(rows, peer)).map(|(m, p)| m / p);
            let _ = write!(o, " {} |", opt(ratio, 2));
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "\n![CPU per request at 1,000 rps](cpu-1k.svg)\n\n## (7) Latency at 1,000 rps, and what each proxy adds over direct\n\nThe same runs as (6). Added: the proxy's percentile minus direct's (medians of the repetitions); the goal is remora's p50 and p99 added ≤ haproxy's.\n\n| load | proxy | ok rps | errors | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | added p99.9 µs |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for (load, rows) in &r.at_1k {
        for x in rows {
            let (a50, a99, a999) = match x.name.as_str() {
                "direct" => (None, None, None),
                n => (
                    over_direct(rows, n, |r| r.p50),
                    over_direct(rows, n, |r| r.p99),
                    over_direct(rows, n, |r| r.p999),
                ),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                load.label(),
                x.name,
                x.rps,
                x.errors,
                opt(x.p50, 0),
                opt(x.p99, 0),
                opt(x.p999, 0),
                signed(a50),
                signed(a99),
                signed(a999)
            );
        }
    }
    let _ = writeln!(o, "\n![p99 added over direct at 1,000 rps](added-1k.svg)\n");
}

/// Section (8): RSS with idle HTTP/2 connections.
fn render_idle(o: &mut String, idle: &[IdleRow], limit: u64) {
    let wanted = idle.first().map(|i| i.wanted).unwrap_or(0);
    let (conns, n) = (wanted as u64 + 1024, thousands(wanted as u64));
    let _ = writeln!(
        o,
        "## (8) Memory with {n} idle HTTP/2 connections\n\nA fresh instance of each proxy, its limits raised for the test: the descriptor limit {}{}, remora's connection limit per listener derived from it ((limit − 128) / 4 = {}), nginx `worker_connections` and haproxy `maxconn` {} (with `no strict-limits`). One warm-up request, then RSS (before); then the `idle-conns` helper on CPU 1 opens {n} connections one after the other, each through the preface, the SETTINGS exchange (both acknowledged) and one `GET /small` answered in full, and holds them idle; RSS (with) is the largest of five samples after they settle. Per connection: (with − before) / opened. Held: still open after the samples.\n\n| proxy | opened | held | RSS before MiB | RSS with {n} idle MiB | per connection |\n|---|---|---|---|---|---|",
        thousands(limit),
        match limit < idle_nofile(wanted) {
            true => format!(
                " (the hard limit here; raising it to {} needs CAP_SYS_RESOURCE)",
                thousands(idle_nofile(wanted))
            ),
            false => String::new(),
        },
        thousands(remora_max_conns(limit)),
        thousands(conns)
    );
    for i in idle {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            i.name,
            thousands(i.opened as u64),
            thousands(i.held as u64),
            mib(Some(i.rss_before_kib)),
            mib(Some(i.rss_kib)),
            kib(i.bytes_per_conn())
        );
    }
    let _ = writeln!(o, "\n![Memory per idle connection](idle-conns.svg)\n");
}

/// The bar charts next to report.md, drawn by `plot` (one bar per proxy, remora's
/// highlighted; the 1k-rps charts grouped by load).
fn write_plots(
    dir: &Path,
    s1: &[Row],
    s2: &[Row],
    s5: &[Row],
    at_1k: &[AtLoad],
    idle: &[IdleRow],
) -> Result<(), String> {
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
        (
            "idle-conns.svg",
            "RSS per idle HTTP/2 connection (lower is better)",
            "KiB",
            idle.iter()
                .filter_map(|i| Some((i.name.clone(), i.bytes_per_conn()? / 1024.0)))
                .collect(),
        ),
    ];
    for (file, title, unit, items) in charts {
        crate::plot::bars(&dir.join(file), title, unit, &items, "remora")?;
    }
    let grouped = |f: &dyn Fn(&[Row], &Row) -> Option<f64>| -> Vec<crate::plot::BarGroup> {
        at_1k
            .iter()
            .map(|(load, rows)| {
                let bars = rows
                    .iter()
                    .filter(|r| r.name != "direct")
                    .filter_map(|r| Some((r.name.clone(), f(rows, r)?)))
                    .collect();
                (load.label(), bars)
            })
            .collect()
    };
    crate::plot::grouped_bars(
        &dir.join("cpu-1k.svg"),
        "Proxy CPU per request at 1,000 rps (lower is better)",
        "µs",
        &grouped(&|_, r| r.cpu_us),
        "remora",
    )?;
    crate::plot::grouped_bars(
        &dir.join("added-1k.svg"),
        "p99 added over direct at 1,000 rps (lower is better)",
        "µs",
        &grouped(&|rows, r| over_direct(rows, &r.name, |x| x.p99)),
        "remora",
    )?;
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

    /// The goals table judges remora against haproxy and nginx from the run's own figures.
    #[test]
    fn goals_show_met_and_the_gap() {
        let at = |remora: f64, haproxy: f64, nginx: f64| -> Vec<Row> {
            let r = |name: &str, cpu: Option<f64>, p50: f64, p99: f64| Row {
                name: name.into(),
                rps: 1000.0,
                cpu_us: cpu,
                p50: Some(p50),
                p99: Some(p99),
                p999: Some(p99 * 2.0),
                ..Row::default()
            };
            vec![
                r("direct", None, 50.0, 100.0),
                r("remora", Some(remora), 140.0, 300.0),
                r("haproxy", Some(haproxy), 150.0, 250.0),
                r("nginx", Some(nginx), 130.0, 200.0),
            ]
        };
        let results = Results {
            quick: false,
            reps: 3,
            n: 200_000,
            secs: 8,
            s1: vec![
                Row {
                    rps: 200_000.0,
                    ..row("direct", 0.0, None, None, None)
                },
                Row {
                    rps: 180_000.0,
                    rss_idle_kib: Some(4 * 1024),
                    ..row("remora", 0.0, Some(3.0), None, None)
                },
                row("haproxy", 190_000.0, Some(4.0), None, None),
            ],
            s2: vec![],
            s3: vec![
                row("direct", 0.0, None, Some(100.0), None),
                row(
                    "two remora hops, plaintext",
                    0.0,
                    Some(100.0),
                    Some(300.0),
                    None,
                ),
                row("two remora hops, mTLS", 0.0, Some(105.0), Some(400.0), None),
                row(
                    "two haproxy hops, plaintext (reference)",
                    0.0,
                    Some(90.0),
                    Some(350.0),
                    None,
                ),
            ],
            s4: vec![],
            s5: vec![row("remora", 0.0, None, None, Some(20 * 1024))],
            s9: vec![
                row(
                    "remora, 1 thread on CPU 0",
                    100_000.0,
                    Some(8.0),
                    None,
                    None,
                ),
                row(
                    "remora, REMORA_THREADS=2 on CPUs 0-1",
                    150_000.0,
                    Some(8.8),
                    None,
                    None,
                ),
            ],
            hs: Some(crate::mtls::Handshakes {
                plain_us: 60.0,
                full_us: 340.0,
                full_per_s: 1500.0,
                resumed_us: 210.0,
                resumed_per_s: 2700.0,
                resumed: 5000,
                resumed_of: 5001,
            }),
            at_1k: vec![
                (LOADS[0], at(40.0, 60.0, 55.0)),
                (LOADS[3], at(75.0, 52.0, 60.0)),
            ],
            idle: vec![IdleRow {
                name: "remora".into(),
                wanted: 10_000,
                opened: 4968,
                held: 4968,
                rss_before_kib: 10_000,
                rss_kib: 10_000 + 4968 * 2,
            }],
            idle_limit: 20_000,
            skipped: vec![],
            layout: Ok(crate::layout::Coverage {
                found: 1900,
                expected: 2000,
                in_front: 1900,
            }),
        };
        let report = render(&results);
        for line in [
            "Text layout: 1900 of the 2000 functions `proxy/layout/remora-proxy.order` lists for one build are in the measured binary (95 %), 1900 of them at the front of its text; laid out together at the front of the text.",
            // 40 ≤ 0.8 × min(60, 55) = 44.
            "| CPU/request at 1,000 rps, h2c, 1 connection ≤ 0.8× haproxy's and nginx's | 40.0 µs | 60.0 µs (remora 0.67×) | 55.0 µs (remora 0.73×) | ✓ |",
            // 75 against 0.8 × min(52, 60) = 41.6.
            "| CPU/request at 1,000 rps, gRPC, 10 connections ≤ 0.8× haproxy's and nginx's | 75.0 µs | 52.0 µs (remora 1.44×) | 60.0 µs (remora 1.25×) | ✗ needs ≤ 41.6 µs (-45 %) |",
            "| p50 / p99 added over direct at 1,000 rps, h2c, 1 connection ≤ haproxy's | +90 / +200 µs | +100 / +150 µs | +80 / +100 µs | ✗ over haproxy's: p99 +50 µs |",
            "| Idle RSS ≤ 5 MiB | 4.0 MiB | – | – | ✓ |",
            "| RSS with 1,000 concurrent streams ≤ 12 MiB | 20.0 MiB | – | – | ✗ +8.0 MiB over |",
            "| Bytes per idle HTTP/2 connection, 10,000 connections: bounded | 2.0 KiB (4,968 of 10,000 held) | – | – | reported (no threshold) |",
            "## (8) Memory with 10,000 idle HTTP/2 connections",
            "nginx `worker_connections` and haproxy `maxconn` 11,024 (with `no strict-limits`)",
            "| CPU/request saturated, one hop h2c ≤ haproxy's | 3.0 µs | 4.0 µs | – | ✓ |",
            "| Max rps, one thread, h2c ≥ 0.85× direct (where the generator allows) | 0.90× direct | 0.95× direct | – | ✓ |",
            "| Two remora hops with mTLS: p99 over direct ≤ 150 µs | +300 µs | – | – | ✗ +150 µs over |",
            "| (reference) Two haproxy hops, plaintext: p99 over direct | – | +250 µs | – | reported (the floor of this layout) |",
            "| mTLS handshake with session resumption (server CPU over a plaintext connection) ≤ 200 µs | 150 µs (full: 280 µs) | – | – | ✓ |",
            "| mTLS CPU per request over plaintext (two hops, 1,000 rps) ≤ 10 % | +5.0 % | – | – | ✓ |",
            "| REMORA_THREADS=2: ≥ 1.8× one thread's rps (needs free CPUs) | 1.50× rps; 1.10× CPU/request | – | – | not measurable on 2 CPUs, see (9) |",
            "| remora, REMORA_THREADS=2 on CPUs 0-1 | 150000 | 0 | 8.8 |",
            "| **remora ÷ haproxy** (goal ≤ 0.80) | 0.67 | 1.44 |",
            "| h2c, 1 connection | remora | 1000 | 0 | 140 | 300 | 600 | +90 | +200 | +400 |",
            "| remora | 4,968 | 4,968 | 9.8 | 19.5 | 2.0 KiB |",
            "the descriptor limit 20,000 (the hard limit here; raising it to 65,536 needs CAP_SYS_RESOURCE), remora's connection limit per listener derived from it ((limit − 128) / 4 = 4,968)",
        ] {
            assert!(report.contains(line), "no line {line}\n{report}");
        }
    }

    #[test]
    fn write_plots_draws_every_chart() {
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
        let at_1k = vec![
            (
                LOADS[0],
                vec![
                    Row {
                        p99: Some(100.0),
                        ..row("direct", 1000.0, None, None, None)
                    },
                    Row {
                        p99: Some(350.0),
                        ..row("remora", 1000.0, Some(75.0), None, None)
                    },
                    Row {
                        p99: Some(250.0),
                        ..row("haproxy", 1000.0, Some(52.0), None, None)
                    },
                ],
            ),
            (
                LOADS[3],
                vec![
                    Row {
                        p99: Some(120.0),
                        ..row("direct", 1000.0, None, None, None)
                    },
                    Row {
                        p99: Some(400.0),
                        ..row("remora", 1000.0, Some(81.5), None, None)
                    },
                    Row {
                        p99: Some(300.0),
                        ..row("haproxy", 1000.0, Some(65.0), None, None)
                    },
                ],
            ),
        ];
        let idle = [
            IdleRow {
                name: "remora".into(),
                wanted: 10_000,
                opened: 10_000,
                held: 10_000,
                rss_before_kib: 8 * 1024,
                rss_kib: 8 * 1024 + 200_000,
            },
            IdleRow {
                name: "haproxy".into(),
                wanted: 10_000,
                opened: 10_000,
                held: 10_000,
                rss_before_kib: 15 * 1024,
                rss_kib: 15 * 1024 + 300_000,
            },
        ];
        write_plots(&dir.0, &s1, &s2, &s5, &at_1k, &idle).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.0.join(f)).unwrap();
        // The grouped 1k-rps charts: a title per load, a bar per proxy (direct left out).
        for (file, title, labels) in [
            (
                "cpu-1k.svg",
                "Proxy CPU per request at 1,000 rps (lower is better)",
                &["75.0 µs", "52.0 µs", "81.5 µs", "65.0 µs"][..],
            ),
            (
                "added-1k.svg",
                "p99 added over direct at 1,000 rps (lower is better)",
                &["250.0 µs", "150.0 µs", "280.0 µs", "180.0 µs"][..],
            ),
        ] {
            let svg = read(file);
            let svg = well_formed(&svg);
            assert!(svg.contains(title), "{file}: no title");
            for l in labels
                .iter()
                .chain(&["h2c, 1 connection", "gRPC, 10 connections"])
            {
                assert!(svg.contains(&format!("{l}\n</text>")), "{file}: no {l}");
            }
            assert_eq!(svg.matches(r##"fill="#1F77B4""##).count(), 2, "{file}");
            assert_eq!(svg.matches(r##"fill="#9AA5B1""##).count(), 2, "{file}");
        }
        let svg = read("idle-conns.svg");
        let svg = well_formed(&svg);
        // (200,000 KiB × 1024 / 10,000) / 1024 = 20.0 KiB per connection.
        for l in ["20.0 KiB", "30.0 KiB"] {
            assert!(
                svg.contains(&format!("{l}\n</text>")),
                "idle-conns.svg: no {l}"
            );
        }
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
