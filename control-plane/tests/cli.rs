//! The `remora control` binary: input errors name the file, line or flag and exit non-zero; a
//! good configuration serves /ready and stops on SIGTERM.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_remora");

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-cp-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn control(dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .args(["control", "--addr", "127.0.0.1:0", "--admin-addr"])
        .arg(extra.first().copied().unwrap_or("127.0.0.1:0"))
        .arg("--issuer")
        .arg(dir.join("ca"))
        .args(&extra[1.min(extra.len())..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn setup(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    remora_certs::ca::init_dir(&dir.join("ca"), "cluster.local").unwrap();
    std::fs::write(
        dir.join("tokens"),
        "0123456789abcdef0123 spiffe://cluster.local/ns/a/sa/b\n",
    )
    .unwrap();
    dir
}

fn fails_with(dir: &std::path::Path, args: &[&str], needles: &[&str]) {
    let mut full = vec!["127.0.0.1:0"];
    full.extend_from_slice(args);
    let out = control(dir, &full).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "missing {n:?} in: {stderr}");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = setup("bad");
    let tokens = dir.join("tokens");
    let tokens = tokens.to_str().unwrap();
    fails_with(
        &dir,
        &["--bootstrap-tokens", tokens],
        &["choose an endpoint source"],
    );
    let eps = dir.join("eps.toml");
    std::fs::write(
        &eps,
        "[[service]]\nname = \"web:80\"\nendpoints = [{ addr = \"10.0.0.1\" }]\n",
    )
    .unwrap();
    let eps = eps.to_str().unwrap();
    fails_with(
        &dir,
        &["--endpoints-file", eps],
        &["choose how tokens are checked"],
    );
    fails_with(
        &dir,
        &["--endpoints-file", eps, "--bootstrap-tokens", tokens],
        &["eps.toml: line 3: endpoint address \"10.0.0.1\" is not ip:port"],
    );
    fails_with(
        &dir,
        &[
            "--endpoints-file",
            eps,
            "--bootstrap-tokens",
            tokens,
            "--max-connections-per-peer",
            "0",
        ],
        &["--max-connections-per-peer must be at least 1"],
    );
    std::fs::write(dir.join("ca/issuer.key"), "garbage").unwrap();
    std::fs::write(dir.join("eps.toml"), "").unwrap();
    fails_with(
        &dir,
        &["--endpoints-file", eps, "--bootstrap-tokens", tokens],
        &["issuer.key"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serves_ready_and_stops_on_sigterm() {
    let dir = setup("good");
    let eps = dir.join("eps.toml");
    std::fs::write(
        &eps,
        "[[service]]\nname = \"web:80\"\nendpoints = [{ addr = \"10.0.0.1:80\" }]\n",
    )
    .unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = control(
        &dir,
        &[
            &admin.to_string(),
            "--endpoints-file",
            eps.to_str().unwrap(),
            "--bootstrap-tokens",
            dir.join("tokens").to_str().unwrap(),
        ],
    )
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = std::net::TcpStream::connect(admin).ok().and_then(|mut s| {
            use std::io::Write;
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"))
        });
        if ok == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remora control never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "remora control did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
