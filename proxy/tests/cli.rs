//! The `remora-proxy` binary: configuration errors that name the knob, readiness, and a quick
//! exit on SIGTERM when idle.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_remora-proxy");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proxy(envs: &[(&str, String)]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("REMORA_INBOUND_ADDR", "127.0.0.1:0")
        .env("REMORA_OUTBOUND_ADDR", "127.0.0.1:0")
        .env("REMORA_ADMIN_ADDR", "127.0.0.1:0");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn fails_naming(envs: &[(&str, String)], needles: &[&str]) {
    let out = proxy(envs).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error should name {n}: {stderr}");
    }
}

#[test]
fn configuration_errors_name_the_knob_and_the_fix() {
    fails_naming(
        &[("REMORA_DESTINATIONS", "echo.test:80".into())],
        &["REMORA_DESTINATIONS", "NAME:PORT=IP:PORT"],
    );
    fails_naming(
        &[("REMORA_DESTINATIONS", "echo.test:80=localhost".into())],
        &["REMORA_DESTINATIONS", "IP:PORT"],
    );
    fails_naming(
        &[("REMORA_INBOUND_ADDR", "not-an-address".into())],
        &["inbound-addr", "not-an-address"],
    );
    fails_naming(
        &[("REMORA_DETECT_TIMEOUT", "soon".into())],
        &["detect-timeout", "10s"],
    );
    fails_naming(&[("REMORA_LOG", "info,=bad=".into())], &["REMORA_LOG"]);
    fails_naming(
        &[("REMORA_IDENTITY_MODE", "control".into())],
        &["REMORA_IDENTITY_MODE=control needs REMORA_IDENTITY"],
    );
    fails_naming(
        &[
            ("REMORA_IDENTITY_MODE", "control".into()),
            ("REMORA_IDENTITY", "spiffe://td/ns/a/sa/b".into()),
        ],
        &["REMORA_IDENTITY_MODE=control needs REMORA_CONTROL_ADDR"],
    );
    fails_naming(
        &[("REMORA_CONTROL_ADDR", "127.0.0.1:8086".into())],
        &[
            "REMORA_CONTROL_ADDR needs a trust bundle",
            "REMORA_IDENTITY_DIR",
        ],
    );
    fails_naming(
        &[("REMORA_CONTROL_ADDR", "127.0.0.1:8086#http://x".into())],
        &["REMORA_CONTROL_ADDR identity `http://x`"],
    );
    let p = free_port();
    fails_naming(
        &[
            ("REMORA_INBOUND_ADDR", format!("127.0.0.1:{p}")),
            ("REMORA_OUTBOUND_ADDR", format!("127.0.0.1:{p}")),
        ],
        &["REMORA_INBOUND_ADDR", "REMORA_OUTBOUND_ADDR", "own port"],
    );
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    fails_naming(
        &[("REMORA_ADMIN_ADDR", addr.to_string())],
        &["REMORA_ADMIN_ADDR", &addr.to_string(), "free port"],
    );
}

fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn becomes_ready_and_exits_promptly_on_sigterm() {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = proxy(&[
        ("REMORA_ADMIN_ADDR", admin.to_string()),
        ("REMORA_LOG_FORMAT", "json".into()),
    ])
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(admin, "/ready") != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(admin, "/live"), Some(200));
    let start = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        // The goal is 100 ms; the bound is generous so a loaded machine does not flake.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "idle proxy took {:?} to exit after SIGTERM",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    eprintln!("idle proxy exited {:?} after SIGTERM", start.elapsed());
    assert!(out.success(), "{out:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // JSON logs, one object per line.
    assert!(stderr.lines().all(|l| l.starts_with('{')), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}

/// Starts `python3 -m http.server` on a free port and waits until it accepts.
fn http_server() -> (std::process::Child, SocketAddr) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 (run .ci/setup)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "http.server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

fn wait_exit(child: &mut std::process::Child, bound: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < bound,
            "process did not exit within {bound:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn await_runs_the_job_then_stops_the_proxy_with_the_jobs_status() {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (mut web, web_addr) = http_server();
    // The job starts first: `await` must hold it until the proxy is ready, so that its first
    // (and only) outbound call succeeds without any retry of its own.
    let job = format!("curl -sf -o /dev/null -x http://{outbound} http://web.test/ && exit 3");
    let mut waiter = proxy(&[("REMORA_ADMIN_ADDR", admin.to_string())])
        .args(["await", "--timeout", "30s", "--", "sh", "-c", &job])
        .spawn()
        .unwrap();
    let mut sidecar = proxy(&[
        ("REMORA_ADMIN_ADDR", admin.to_string()),
        ("REMORA_OUTBOUND_ADDR", outbound.to_string()),
        ("REMORA_DESTINATIONS", format!("web.test:80={web_addr}")),
    ])
    .spawn()
    .unwrap();
    let status = wait_exit(&mut waiter, Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(3),
        "await exits with the job's status (3 only if curl succeeded)"
    );
    // …and the sidecar was told to stop, so the Job's pod can complete.
    let status = wait_exit(&mut sidecar, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let _ = web.kill();
    let _ = web.wait();
}

#[test]
fn await_gives_up_clearly_when_no_proxy_comes() {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = proxy(&[("REMORA_ADMIN_ADDR", admin.to_string())])
        .args(["await", "--timeout", "300ms", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("not ready within") && stderr.contains("REMORA_ADMIN_ADDR"),
        "{stderr}"
    );
}
