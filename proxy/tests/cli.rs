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
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "idle proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(out.success(), "{out:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // JSON logs, one object per line.
    assert!(stderr.lines().all(|l| l.starts_with('{')), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}
