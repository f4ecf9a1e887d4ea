//! `remora-proxy await [--timeout D] -- CMD ARGS…`: run a Job's command beside the sidecar.
//!
//! Waits until the local proxy answers `/ready` with 200 (so the command's first call does not
//! fail), runs the command with SIGTERM/SIGINT/SIGHUP forwarded to it, and when it exits asks
//! the proxy to stop (`POST /shutdown`) so the pod can complete. Exits with the command's status.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The admin address to call: a wildcard listen address is reached over loopback.
pub fn local_admin(admin: SocketAddr) -> SocketAddr {
    let ip = match admin.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, admin.port())
}

/// One HTTP/1.0 exchange with the admin server; returns the status code.
fn admin_call(admin: SocketAddr, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

pub fn run(admin: SocketAddr, timeout: Duration, cmd: &[String]) -> ExitCode {
    let admin = local_admin(admin);
    let Some((program, args)) = cmd.split_first() else {
        eprintln!("remora-proxy await: no command given; use `remora-proxy await -- CMD ARGS…`");
        return ExitCode::from(2);
    };
    let deadline = Instant::now() + timeout;
    loop {
        match admin_call(admin, "GET", "/ready") {
            Ok(200) => break,
            last => {
                if Instant::now() >= deadline {
                    let why = match last {
                        Ok(code) => format!("it answered {code}"),
                        Err(e) => e.to_string(),
                    };
                    eprintln!(
                        "remora-proxy await: the proxy at http://{admin}/ready was not ready within {timeout:?} ({why}); \
                         is the sidecar running, and is REMORA_ADMIN_ADDR the same for both?"
                    );
                    return ExitCode::from(69);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let status = run_forwarding_signals(program, args);
    match admin_call(admin, "POST", "/shutdown") {
        Ok(202) => {}
        Ok(code) => eprintln!("remora-proxy await: POST http://{admin}/shutdown answered {code}"),
        Err(e) => eprintln!("remora-proxy await: could not stop the proxy at {admin}: {e}"),
    }
    status
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; pid is our own child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn run_forwarding_signals(program: &str, args: &[String]) -> ExitCode {
    let mut child = match std::process::Command::new(program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("remora-proxy await: cannot run `{program}`: {e}");
            return ExitCode::from(127);
        }
    };
    CHILD.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only reads an atomic and calls kill(2).
        unsafe {
            libc::signal(sig, forward as *const () as libc::sighandler_t);
        }
    }
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("remora-proxy await: waiting for `{program}` failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    }
}
