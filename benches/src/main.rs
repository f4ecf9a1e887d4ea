//! remora's benchmark harness. Scenario so far: one hop, h2c, small responses from nghttpd,
//! fixed concurrency — direct (the baseline row) against remora's inbound.
//!
//!   cargo run -p benches --release -- [compare|one-hop|rolling-restart|balance|mtls|control|policy|kube-scale|soak|quic|all] [--quick]
//!   (`kube-scale` needs the real API server of tests/kube/cluster.sh; `all` does not run it,
//!   CI runs it on its own)
//!   (`soak` is long: 30 min by default, `--duration`, `--quick` for 20 s; `all` runs it only with `--soak`)
//!   (`quic`: the meshed hop over QUIC against TCP + mTLS on a lossy link between two network
//!   namespaces; needs root and iproute2, `all` does not run it; see quic.rs)
//!
//! The remora-proxy measured is the release build of its package (`cargo build --release -p
//! remora-proxy`, as it ships), unless `--proxy-bin PATH` (or
//! `REMORA_BENCH_PROXY=PATH`) names another binary. `one-hop` takes `--proxy-bin` more than once
//! and measures every binary in the same run, repetitions interleaved, one row each
//! (`--proxy-bin workspace` is the workspace's build), to compare two commits on one machine.
//!
//! Method: the proxy under test is pinned to CPU 0, the load generator and the backend to CPU 1
//! (taskset), a warm-up run precedes the counted runs, CPU time is read from /proc/PID/stat of
//! the proxy alone, and the median of the repetitions is reported. Envoy, nginx and haproxy rows
//! and the other scenarios are the benchmark issue's work.

mod balance;
mod compare;
mod control;
mod kube_scale;
mod layout;
mod load;
mod mtls;
mod peers;
mod plot;
mod policy;
mod quic;
mod soak;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The remora-proxy binaries given with `--proxy-bin` (or REMORA_BENCH_PROXY); empty: build the
/// workspace's. Set once in main, before any scenario runs.
static PROXY_BINS: OnceLock<Vec<ProxyBin>> = OnceLock::new();

/// A remora-proxy binary to measure.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ProxyBin {
    /// The workspace's release build (built by the harness).
    Workspace,
    /// A binary built elsewhere, e.g. at another commit.
    Path(PathBuf),
}

pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub(crate) fn wait_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on port {port} after 30 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(crate) fn spawn(
    cpu: &str,
    program: &str,
    args: &[&str],
    envs: &[(&str, String)],
) -> Result<Guard, String> {
    start_pinned(cpu, program, args, envs, Stdio::null())
}

fn start_pinned(
    cpu: &str,
    program: &str,
    args: &[&str],
    envs: &[(&str, String)],
    stderr: Stdio,
) -> Result<Guard, String> {
    let mut c = Command::new("taskset");
    c.arg("-c")
        .arg(cpu)
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn()
        .map(Guard)
        .map_err(|e| format!("{program}: {e} (is it installed? run .ci/setup)"))
}

/// [`spawn`], with the program's stderr kept in `log`, so that a proxy that never becomes ready
/// can say why ([`wait_ready_logged`]).
pub(crate) fn spawn_logged(
    cpu: &str,
    program: &str,
    envs: &[(&str, String)],
    log: &Path,
) -> Result<Guard, String> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    start_pinned(cpu, program, &[], envs, file.into())
}

/// [`wait_ready`] for a proxy started by [`spawn_logged`]: when it exits first, or is not ready
/// within 30 s, the error has its exit status and the end of its log.
pub(crate) fn wait_ready_logged(g: &mut Guard, admin: u16, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = admin_get(admin, "/ready");
        if ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200") {
            return Ok(());
        }
        let exited = g.0.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "proxy with admin port {admin} {}; the end of its stderr ({}): {}",
                match exited {
                    Some(status) => format!("exited ({status}) before it was ready"),
                    None => "never became ready".to_string(),
                },
                log.display(),
                tail.join(" | ")
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Run {
    rps: f64,
    errors: u64,
}

fn h2load(port: u16, requests: u32) -> Result<Run, String> {
    let url = format!("http://127.0.0.1:{port}/small");
    let (rps, errors, _) =
        compare::h2load(&["-n", &requests.to_string(), "-c", "16", "-m", "10", &url])?;
    Ok(Run { rps, errors })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// One proxy under test in `one-hop`.
struct HopProxy {
    label: String,
    bin: PathBuf,
    inbound: u16,
    pid: u32,
    idle_rss: u64,
    _guard: Guard,
}

fn one_hop(quick: bool) -> Result<(), String> {
    // Which binaries: the workspace's build, or every `--proxy-bin` given, in that order.
    let given = PROXY_BINS.get().cloned().unwrap_or_default();
    let named = !given.is_empty();
    let bins = if given.is_empty() {
        vec![ProxyBin::Workspace]
    } else {
        given
    };
    let bins: Vec<PathBuf> = bins.iter().map(resolve_proxy).collect::<Result<_, _>>()?;
    let docroot = std::env::temp_dir().join(format!("remora-bench-{}", std::process::id()));
    std::fs::create_dir_all(&docroot).map_err(|e| e.to_string())?;
    std::fs::write(docroot.join("small"), vec![b'x'; 128]).map_err(|e| e.to_string())?;

    let backend = free_port();
    let _nghttpd = spawn(
        "1",
        "nghttpd",
        &[
            "--no-tls",
            "-d",
            docroot.to_str().unwrap_or("."),
            &backend.to_string(),
        ],
        &[],
    )?;
    wait_port(backend)?;
    // Every proxy runs for the whole scenario, all pinned to CPU 0; only the one under load
    // works at a time, and CPU is read per process.
    let mut proxies = Vec::new();
    for bin in &bins {
        let (inbound, outbound, admin) = (free_port(), free_port(), free_port());
        let guard = spawn(
            "0",
            bin.to_str().unwrap_or("remora-proxy"),
            &[],
            &[
                ("REMORA_INBOUND_ADDR", format!("127.0.0.1:{inbound}")),
                ("REMORA_OUTBOUND_ADDR", format!("127.0.0.1:{outbound}")),
                ("REMORA_ADMIN_ADDR", format!("127.0.0.1:{admin}")),
                ("REMORA_APP_ADDR", format!("127.0.0.1:{backend}")),
                ("REMORA_LOG", "warn".into()),
            ],
        )?;
        wait_port(inbound)?;
        let pid = guard.0.id();
        // The row names the binary whenever it is not just the workspace's default build.
        let label = match named {
            false => "remora (1 thread)".to_string(),
            true => format!("remora (1 thread) {}", bin.display()),
        };
        proxies.push(HopProxy {
            label,
            bin: bin.clone(),
            inbound,
            pid,
            idle_rss: rss_kib(pid),
            _guard: guard,
        });
    }

    let (reps, n) = if quick { (3, 20_000) } else { (5, 200_000) };
    println!(
        "| row | rps (median of {reps}) | errors | proxy CPU µs/request | proxy RSS idle → peak |"
    );
    println!("|---|---|---|---|---|");
    h2load(backend, n / 4)?; // warm-up
    let direct: Vec<f64> = (0..reps)
        .map(|_| h2load(backend, n).map(|r| r.rps))
        .collect::<Result<_, _>>()?;
    let direct = median(direct);
    println!("| direct | {direct:.0} | 0 | – | – |");
    for p in &proxies {
        h2load(p.inbound, n / 4)?;
    }
    // Repetitions interleaved across the binaries (A B, B A, A B...), so drift on a shared
    // machine lands on all of them alike.
    let k = proxies.len();
    let (mut rps, mut cpu) = (vec![Vec::new(); k], vec![Vec::new(); k]);
    let (mut errors, mut peak) = (vec![0; k], vec![0; k]);
    for rep in 0..reps {
        for j in 0..k {
            let i = if rep % 2 == 0 { j } else { k - 1 - j };
            let p = &proxies[i];
            let before = cpu_seconds(p.pid);
            let r = h2load(p.inbound, n)?;
            cpu[i].push((cpu_seconds(p.pid) - before) * 1e6 / n as f64);
            rps[i].push(r.rps);
            errors[i] += r.errors;
            peak[i] = peak[i].max(rss_kib(p.pid));
        }
    }
    let cpu_median: Vec<f64> = cpu.iter().map(|c| median(c.clone())).collect();
    for (i, p) in proxies.iter().enumerate() {
        let rps = median(rps[i].clone());
        println!(
            "| {} | {rps:.0} ({:.2}× direct) | {} | {:.1} | {:.1} MiB → {:.1} MiB |",
            p.label,
            rps / direct.max(1.0),
            errors[i],
            cpu_median[i],
            p.idle_rss as f64 / 1024.0,
            peak[i] as f64 / 1024.0
        );
    }
    println!(
        "\nh2load -c 16 -m 10 against nghttpd serving 128 bytes; proxy on CPU 0, load and backend on CPU 1."
    );
    for (i, p) in proxies.iter().enumerate() {
        println!("remora-proxy {}: {}", i + 1, describe_bin(&p.bin));
    }
    if k > 1 {
        for (i, reps) in cpu.iter().enumerate() {
            let each: Vec<String> = reps.iter().map(|c| format!("{c:.2}")).collect();
            let vs = match i {
                0 => String::new(),
                _ => format!(
                    ", {:+.1} % against remora-proxy 1",
                    (cpu_median[i] / cpu_median[0].max(f64::MIN_POSITIVE) - 1.0) * 100.0
                ),
            };
            println!(
                "remora-proxy {}: CPU µs/request per repetition {}{vs}",
                i + 1,
                each.join(" ")
            );
        }
    }
    let _ = std::fs::remove_dir_all(&docroot);
    Ok(())
}

/// A binary's path with the start of its SHA-256 (`sha256sum`, when there is one), so a result
/// can be tied to the exact build.
fn describe_bin(bin: &Path) -> String {
    let sum = Command::new("sha256sum")
        .arg(bin)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .map(|h| h.chars().take(12).collect::<String>())
        });
    match sum {
        Some(h) => format!("{} (sha256 {h}…)", bin.display()),
        None => bin.display().to_string(),
    }
}

/// GET a path from an admin server; the body.
pub(crate) fn admin_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub(crate) fn wait_ready(admin: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin_get(admin, "/ready").starts_with("HTTP/1.0 200")
        && !admin_get(admin, "/ready").starts_with("HTTP/1.1 200")
    {
        if Instant::now() > deadline {
            return Err(format!("proxy with admin port {admin} never became ready"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(crate) fn proxy_env(
    inbound: u16,
    outbound: u16,
    admin: u16,
    app: u16,
) -> Vec<(&'static str, String)> {
    vec![
        ("REMORA_INBOUND_ADDR", format!("127.0.0.1:{inbound}")),
        ("REMORA_OUTBOUND_ADDR", format!("127.0.0.1:{outbound}")),
        ("REMORA_ADMIN_ADDR", format!("127.0.0.1:{admin}")),
        ("REMORA_APP_ADDR", format!("127.0.0.1:{app}")),
        ("REMORA_LOG", "warn".into()),
        ("REMORA_DRAIN_TIMEOUT", "10s".into()),
    ]
}

/// The remora-proxy the scenarios run: the one `--proxy-bin` / REMORA_BENCH_PROXY names, or the
/// release build of its package ([`build_bin`]). Only `one-hop` measures several binaries.
pub(crate) fn build_proxy() -> Result<PathBuf, String> {
    match PROXY_BINS.get().map(Vec::as_slice).unwrap_or_default() {
        [] => resolve_proxy(&ProxyBin::Workspace),
        [one] => resolve_proxy(one),
        more => Err(format!(
            "{} remora-proxy binaries given; only one-hop compares several, the other scenarios take one",
            more.len()
        )),
    }
}

/// The path of a binary to measure: built from the workspace, or checked to be there.
pub(crate) fn resolve_proxy(bin: &ProxyBin) -> Result<PathBuf, String> {
    match bin {
        ProxyBin::Workspace => build_bin("remora-proxy"),
        ProxyBin::Path(p) => {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(p)
                .map_err(|e| format!("remora-proxy binary {}: {e}", p.display()))?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err(format!(
                    "remora-proxy binary {}: not an executable file",
                    p.display()
                ));
            }
            // Absolute, so the label in the output says which binary it was.
            std::path::absolute(p).map_err(|e| format!("remora-proxy binary {}: {e}", p.display()))
        }
    }
}

/// Builds one of the workspace's release binaries and returns its path. remora-proxy is built
/// as it ships (`-p remora-proxy`): at the workspace root, cargo would also enable the
/// dependency features the tests and benches use (TLS 1.2 in rustls, all of regex's engines),
/// a larger binary with other symbol names than `proxy/layout/` lays out.
pub(crate) fn build_bin(name: &str) -> Result<PathBuf, String> {
    let root = workspace();
    let mut args = vec!["build", "--release"];
    if name == "remora-proxy" {
        args.extend(["-p", "remora-proxy"]);
    }
    let mut cargo = Command::new("cargo");
    // What `cargo run` set for this program, not for the build it starts: build scripts declare
    // some of these (`rerun-if-env-changed=CARGO_MANIFEST_DIR`, ring's among them), so a build
    // that inherits them recompiles those crates and their dependents, and the binary measured
    // differs from the one a shell builds (and `proxy/layout/refresh.sh` profiled): in one run,
    // 15 % of the text layout's functions were missing from it.
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("CARGO_PKG_")
            || key_str.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*key_str,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cargo.env_remove(&key);
        }
    }
    let status = cargo
        .args(args)
        .args(["--bin", name])
        .current_dir(&root)
        .status()
        .map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building {name} failed"));
    }
    // Where that cargo put it: CARGO_TARGET_DIR (or CARGO_BUILD_TARGET_DIR) when set, relative
    // to the workspace like cargo's own reading of it, else the workspace's target/.
    let target = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .iter()
        .find_map(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join(name);
    if !bin.is_file() {
        return Err(format!(
            "cargo built {name} but {} is not there",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Takes `--proxy-bin PATH` / `--proxy-bin=PATH` (repeatable) out of the arguments; without
/// any, REMORA_BENCH_PROXY. `workspace` stands for the workspace's build.
fn take_proxy_bins(args: &mut Vec<String>) -> Result<Vec<ProxyBin>, String> {
    let parse = |v: &str| match v {
        "" => Err("--proxy-bin needs a path (or `workspace`)".to_string()),
        "workspace" => Ok(ProxyBin::Workspace),
        p => Ok(ProxyBin::Path(PathBuf::from(p))),
    };
    let mut bins = Vec::new();
    let mut rest = Vec::new();
    let mut it = std::mem::take(args).into_iter();
    while let Some(a) = it.next() {
        if a == "--proxy-bin" {
            bins.push(parse(&it.next().unwrap_or_default())?);
        } else if let Some(v) = a.strip_prefix("--proxy-bin=") {
            bins.push(parse(v)?);
        } else {
            rest.push(a);
        }
    }
    *args = rest;
    if bins.is_empty()
        && let Some(v) = std::env::var_os("REMORA_BENCH_PROXY").filter(|v| !v.is_empty())
    {
        bins.push(parse(&v.to_string_lossy())?);
    }
    Ok(bins)
}

/// Issue 6's benchmark: 1k rps of gRPC through a client proxy balancing over three backends,
/// each behind its own proxy; one backend proxy is restarted (SIGTERM, exit, start) mid-run.
fn rolling_restart(quick: bool) -> Result<(), String> {
    let proxy_bin = build_proxy()?;
    let proxy_bin = proxy_bin.to_str().unwrap_or("remora-proxy").to_string();
    let mut backends = Vec::new();
    let mut backend_ports = Vec::new();
    for i in 1..=3 {
        let (guard, port) = balance::grpc_backend(&format!("b{i}"), &[])?;
        backend_ports.push(port);
        backends.push(guard);
    }
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let start_backend_proxy = |i: usize| -> Result<Guard, String> {
        let (inb, out, adm) = ports[i];
        let g = spawn(
            "0",
            &proxy_bin,
            &[],
            &proxy_env(inb, out, adm, backend_ports[i]),
        )?;
        wait_ready(adm)?;
        Ok(g)
    };
    let mut server_proxies: Vec<Option<Guard>> = (0..3)
        .map(|i| start_backend_proxy(i).map(Some))
        .collect::<Result<_, _>>()?;
    let (c_in, c_out, c_admin) = (free_port(), free_port(), free_port());
    let mut env = proxy_env(c_in, c_out, c_admin, 9);
    env.push((
        "REMORA_DESTINATIONS",
        format!(
            "echo.test:80={}",
            ports
                .iter()
                .map(|p| format!("127.0.0.1:{}", p.0))
                .collect::<Vec<_>>()
                .join(",")
        ),
    ));
    let _client = spawn("0", &proxy_bin, &[], &env)?;
    wait_ready(c_admin)?;

    // One gRPC unary request body: a 5-byte frame header and a 16-byte message.
    let req = std::env::temp_dir().join(format!("remora-grpc-{}.bin", std::process::id()));
    let mut frame = vec![0u8, 0, 0, 0, 16];
    frame.extend_from_slice(b"rolling restart!");
    std::fs::write(&req, frame).map_err(|e| e.to_string())?;
    let secs = if quick { 6 } else { 20 };
    let url = format!("http://127.0.0.1:{c_out}/remora.test.Echo/Unary");
    let req_s = req.to_str().unwrap_or_default().to_string();
    let duration = secs.to_string();
    let load = std::thread::spawn(move || {
        Command::new("taskset")
            .args([
                "-c", "1", "h2load", "-c", "1", "-m", "10", "--rps", "1000", "-D", &duration, "-d",
                &req_s,
            ])
            .args([
                "-H",
                ":authority: echo.test:80",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                &url,
            ])
            .output()
    });
    std::thread::sleep(Duration::from_secs(secs / 3));
    // The rolling restart of backend 1's proxy: SIGTERM, wait for its drain and exit, start again.
    let restart = Instant::now();
    if let Some(Some(g)) = server_proxies.get_mut(0) {
        let _ = Command::new("kill")
            .args(["-TERM", &g.0.id().to_string()])
            .status();
        let _ = g.0.wait();
    }
    server_proxies[0] = None;
    server_proxies[0] = Some(start_backend_proxy(0)?);
    let restart_took = restart.elapsed();
    let out = load
        .join()
        .map_err(|_| "load thread panicked")?
        .map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("")
        .to_string();
    let codes = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or("")
        .to_string();
    let metrics = admin_get(c_admin, "/metrics");
    let grpc_failed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("remora_requests_total{") && l.contains("direction=\"outbound\""))
        .filter(|l| !l.contains("grpc_status=\"0\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let grpc_ok: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("remora_requests_total{") && l.contains("grpc_status=\"0\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    println!(
        "rolling restart of one of three backend proxies under 1k rps gRPC ({secs} s, h2load -c 1 -m 10 --rps 1000):"
    );
    println!("  restart (SIGTERM → exit → ready again): {restart_took:.2?}");
    println!("  h2load  {requests}");
    println!("  h2load  {codes}");
    println!(
        "  client proxy: {} calls with grpc-status 0, {} calls failed",
        grpc_ok as u64, grpc_failed as u64
    );
    let _ = std::fs::remove_file(&req);
    drop(backends);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match take_proxy_bins(&mut args) {
        Ok(bins) => {
            let _ = PROXY_BINS.set(bins);
        }
        Err(e) => return report(Err(e)),
    }
    let quick = args.iter().any(|a| a == "--quick");
    // Helper roles the harness runs as pinned child processes.
    match args.first().map(String::as_str) {
        Some("backend") => {
            let port = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            return report(load::backend(port));
        }
        Some("grpc-load") => {
            let addr = args.get(1).and_then(|a| a.parse().ok());
            let auth = args.get(2).cloned().unwrap_or_default();
            let rps = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(1000);
            let secs = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5);
            let conns = args.get(5).and_then(|c| c.parse().ok()).unwrap_or(1);
            let kind = args.get(6).map_or(Ok(load::Kind::Grpc), |k| k.parse());
            return report(match (addr, kind) {
                (Some(a), Ok(kind)) => load::rate_load(a, &auth, rps, secs, conns, kind),
                (_, Err(e)) => Err(e),
                (None, _) => Err("grpc-load ADDR AUTHORITY RPS SECS [CONNS [grpc|h2c]]".into()),
            });
        }
        Some("idle-conns") => {
            let addr = args.get(1).and_then(|a| a.parse().ok());
            let auth = args.get(2).cloned().unwrap_or_default();
            let n = args.get(3).and_then(|n| n.parse().ok());
            return report(match (addr, n) {
                (Some(a), Some(n)) => load::idle_conns(a, &auth, n),
                _ => Err("idle-conns ADDR AUTHORITY N".into()),
            });
        }
        Some("grpc-closed") => {
            let addr = args.get(1).and_then(|a| a.parse().ok());
            let auth = args.get(2).cloned().unwrap_or_default();
            let num = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok());
            return report(match (addr, num(3), num(4), num(5)) {
                (Some(a), Some(streams), Some(warmup), Some(window)) => load::grpc_closed(
                    a,
                    &auth,
                    streams as usize,
                    Duration::from_millis(warmup),
                    Duration::from_millis(window),
                ),
                _ => Err("grpc-closed ADDR AUTHORITY STREAMS WARMUP_MS DURATION_MS".into()),
            });
        }
        _ => {}
    }
    let result = match args.first().map(String::as_str) {
        Some("one-hop") => one_hop(quick),
        Some("rolling-restart") => rolling_restart(quick),
        Some("balance") => balance::run(quick),
        Some("mtls") => mtls::run(quick),
        Some("compare") => compare::run(quick),
        Some("control") => control::run(quick),
        Some("kube-scale") => kube_scale::run(quick),
        Some("policy") => policy::run(quick),
        Some("soak") => soak::run(quick, &args[1..]),
        Some("quic") => quic::run(quick, &args[1..]),
        Some("all") | Some("--quick") | None => compare::run(quick)
            .and_then(|()| rolling_restart(quick))
            .and_then(|()| balance::run(quick))
            .and_then(|()| mtls::run(quick))
            .and_then(|()| control::run(quick))
            .and_then(|()| policy::run(quick))
            .and_then(|()| match args.iter().any(|a| a == "--soak") {
                true => soak::run(quick, &args[1..]),
                false => Ok(()),
            }),
        Some(other) => Err(format!(
            "unknown scenario `{other}`; scenarios: compare, one-hop, rolling-restart, balance, mtls, control, policy, kube-scale, soak, quic, all"
        )),
    };
    report(result)
}

fn report(result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benches: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
