//! Traffic policy (issue "traffic policy without CRDs"): what it costs and whether it holds.
//!
//! `remora control` (file source) feeds three proxies: a client proxy pinned to CPU 0 (the
//! one measured) and two server proxies in front of nghttpd, all on the release build, with
//! certificates from the control plane. Rows:
//! - CPU per request of the client proxy with no policy against every outbound policy at once
//!   (timeout, retries, failure accrual, a header route that does not match, a 5 % split to a
//!   service on the same endpoint), same run, alternating repetitions;
//! - a rate limit of 100 rps on the second server under 1,000 rps offered (h2load `--rps`),
//!   the rate served after the first second's burst.

use std::fmt::Write as _;

use crate::{Guard, cpu_seconds, free_port, spawn, wait_port, wait_ready};

const TD: &str = "bench.local";

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
    let eps = format!(
        "[[service]]\nname = \"plain.bench:80\"\nendpoints = [{{ addr = \"127.0.0.1:{web_in}\" }}]\n\
         [[service]]\nname = \"policied.bench:80\"\ntimeout = \"5s\"\nretries = 2\nfailure_accrual = 7\n\
         routes = \"header:x-bench-route=never=>plain.bench:80\"\nsplit = \"canary.bench:80=5\"\n\
         endpoints = [{{ addr = \"127.0.0.1:{web_in}\" }}]\n\
         [[service]]\nname = \"canary.bench:80\"\nendpoints = [{{ addr = \"127.0.0.1:{web_in}\" }}]\n\
         [[service]]\nname = \"limited.bench:80\"\nrate_limit = 100\n\
         endpoints = [{{ addr = \"127.0.0.1:{limited_in}\" }}]\n"
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
