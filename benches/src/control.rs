//! The control plane under a mesh-sized load: 1,000 services × 10 endpoints from the file
//! source, 100 proxies each certifying once and watching 20 services.
//!
//! `remora control` (release build) runs pinned to CPU 0; the 100 proxies run in this process
//! on CPU 1, each with its own TLS connection, through the proxy's own control-plane client
//! (`remora_api::client`), so the control plane sees exactly what real proxies send. CPU
//! time and RSS are read from /proc for the control plane alone.
//!
//! Phases: load the table (RSS), 100 Certify calls, 2,000 Watch subscriptions (time until
//! every snapshot arrived), 5 s idle with everything connected, then 10 endpoint-file edits a
//! second apart, each moving one endpoint in 100 services (CPU per reload, time until every
//! affected watcher has its delta).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_api::client::ControlClient;

use crate::{Guard, cpu_seconds, free_port, rss_kib, spawn, workspace};

const TD: &str = "bench.local";

fn service(i: usize) -> String {
    format!("svc-{i}.bench.svc.cluster.local:8080")
}

/// The endpoints file; `generation` moves the last endpoint of the first `moved` services.
fn endpoints_file(services: usize, per: usize, moved: usize, generation: usize) -> String {
    let mut out = String::with_capacity(services * per * 90);
    for s in 0..services {
        let _ = writeln!(out, "[[service]]\nname = \"{}\"\nendpoints = [", service(s));
        for e in 0..per {
            let last = if s < moved && e + 1 == per {
                generation
            } else {
                0
            };
            let _ = writeln!(
                out,
                "  {{ addr = \"10.{}.{}.{}:8080\", identity = \"spiffe://{TD}/ns/bench/sa/svc-{s}\" }},",
                s / 250,
                s % 250,
                e + 1 + last * per
            );
        }
        out.push_str("]\n");
    }
    out
}

fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

struct Proxy {
    client: ControlClient,
    id: remora_certs::SpiffeId,
    token: String,
}

pub fn run(quick: bool) -> Result<(), String> {
    let (services, per, proxies, watches_each) = if quick {
        (100, 10, 10, 20)
    } else {
        (1000, 10, 100, 20)
    };
    let edits = if quick { 2 } else { 10 };
    let moved = services / 10;
    let bin = crate::build_bin("remora")?;
    let dir = std::env::temp_dir().join(format!("remora-bench-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    remora_certs::ca::init_dir(&dir.join("ca"), TD).map_err(|e| e.to_string())?;
    let eps = dir.join("endpoints.toml");
    write_atomic(&eps, &endpoints_file(services, per, moved, 0))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // tonic's lazy channel spawns its worker on the current runtime.
    let _enter = rt.enter();
    let mut tokens = String::new();
    let mut fleet = Vec::new();
    let (port, admin) = (free_port(), free_port());
    let cp_addr = format!("127.0.0.1:{port}");
    let cp_id = remora_certs::identity::default_control_identity(TD)?;
    for p in 0..proxies {
        let id: remora_certs::SpiffeId = format!("spiffe://{TD}/ns/bench/sa/proxy-{p}")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let token = format!("bench-token-{p:04}-0123456789");
        let _ = writeln!(tokens, "{token} {id}");
        let client = ControlClient::new(
            vec![cp_addr.clone()],
            Some(cp_id.clone()),
            dir.join("ca/ca.crt"),
            Arc::new(|| Some(TD.to_string())),
        )?;
        fleet.push(Proxy { client, id, token });
    }
    std::fs::write(dir.join("tokens"), tokens).map_err(|e| e.to_string())?;
    let cp: Guard = spawn(
        "0",
        bin.to_str().unwrap_or("remora"),
        &[
            "control",
            "--issuer",
            dir.join("ca").to_str().unwrap_or(""),
            "--trust-domain",
            TD,
            "--endpoints-file",
            eps.to_str().unwrap_or(""),
            "--bootstrap-tokens",
            dir.join("tokens").to_str().unwrap_or(""),
            "--addr",
            &cp_addr,
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
        ],
        &[("REMORA_LOG", "warn".into())],
    )?;
    let pid = cp.0.id();
    crate::wait_ready(admin)?;
    let rss_loaded = rss_kib(pid);
    let fleet = Arc::new(fleet);
    let mut report = String::new();
    let mut row = |k: &str, v: String| {
        println!("  {k}: {v}");
        let _ = writeln!(report, "| {k} | {v} |");
    };
    println!(
        "control plane: {services} services × {per} endpoints, {proxies} proxies × {watches_each} watches"
    );
    row(
        "RSS with the table loaded, no proxies",
        format!("{:.1} MiB", rss_loaded as f64 / 1024.0),
    );

    // 100 proxies ask for certificates.
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let certified = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for p in fleet.iter() {
            let (client, id, token) = (p.client.clone(), p.id.clone(), p.token.clone());
            set.spawn(async move {
                let (_key, csr) =
                    remora_certs::ca::new_key_and_csr(&id).map_err(|e| e.to_string())?;
                client
                    .identity()
                    .certify(remora_api::CertifyRequest {
                        identity: id.to_string(),
                        token,
                        csr,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.message().to_string())
            });
        }
        let mut ok = 0;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => return Err(format!("certify failed: {e}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok::<_, String>(ok)
    })?;
    row(
        &format!("Certify ×{proxies} (incl. TLS handshakes)"),
        format!(
            "{certified} issued in {:.0} ms, {:.2} ms CPU each",
            t0.elapsed().as_secs_f64() * 1e3,
            (cpu_seconds(pid) - cpu0) * 1e3 / certified.max(1) as f64
        ),
    );

    // Every proxy watches 20 services; popular ones are watched by several proxies.
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let expect_snapshots = proxies * watches_each;
    let watched: Vec<Vec<usize>> = (0..proxies)
        .map(|p| {
            (0..watches_each)
                .map(|k| (p * 7 + k * 37) % services)
                .collect()
        })
        .collect();
    let snapshots = rt.block_on(async {
        for (p, list) in watched.iter().enumerate() {
            for &s in list {
                let client = fleet[p].client.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let req = remora_api::WatchRequest {
                        service: service(s),
                        client: format!("proxy-{p}"),
                        namespace: String::new(),
                    };
                    let Ok(rsp) = client.discovery().watch(req).await else {
                        return;
                    };
                    let mut stream = rsp.into_inner();
                    while let Ok(Some(_)) = stream.message().await {
                        if tx.send((s, Instant::now())).is_err() {
                            return;
                        }
                    }
                });
            }
        }
        let mut got = 0;
        while got < expect_snapshots {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(_)) => got += 1,
                _ => break,
            }
        }
        got
    });
    if snapshots < expect_snapshots {
        return Err(format!(
            "only {snapshots} of {expect_snapshots} snapshots arrived"
        ));
    }
    row(
        &format!("Watch ×{expect_snapshots}: all snapshots received"),
        format!(
            "{:.0} ms, {:.1} µs CPU per watch",
            t0.elapsed().as_secs_f64() * 1e3,
            (cpu_seconds(pid) - cpu0) * 1e6 / snapshots as f64
        ),
    );

    let cpu0 = cpu_seconds(pid);
    rt.block_on(tokio::time::sleep(Duration::from_secs(if quick {
        1
    } else {
        5
    })));
    row(
        "idle with every proxy connected",
        format!(
            "{:.2} % of a core, RSS {:.1} MiB",
            (cpu_seconds(pid) - cpu0) * 100.0 / if quick { 1.0 } else { 5.0 },
            rss_kib(pid) as f64 / 1024.0
        ),
    );

    // Edits: each moves one endpoint in `moved` services; measure until every watcher of a
    // moved service got its delta.
    let watchers: HashMap<usize, usize> =
        watched.iter().flatten().fold(HashMap::new(), |mut m, &s| {
            *m.entry(s).or_default() += 1;
            m
        });
    let expect: usize = (0..moved)
        .map(|s| watchers.get(&s).copied().unwrap_or(0))
        .sum();
    let (mut lat, mut cpu) = (Vec::new(), Vec::new());
    for g in 1..=edits {
        let text = endpoints_file(services, per, moved, g);
        let c0 = cpu_seconds(pid);
        let start = Instant::now();
        write_atomic(&eps, &text)?;
        let got = rt.block_on(async {
            let mut got = 0;
            while got < expect {
                match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                    Ok(Some((s, _))) if s < moved => got += 1,
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            got
        });
        if got < expect {
            return Err(format!("edit {g}: only {got} of {expect} deltas arrived"));
        }
        lat.push(start.elapsed().as_secs_f64() * 1e3);
        rt.block_on(tokio::time::sleep(Duration::from_millis(1000)));
        cpu.push((cpu_seconds(pid) - c0) * 1e3);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    cpu.sort_by(|a, b| a.total_cmp(b));
    row(
        &format!(
            "endpoint-file edit ({} endpoints parsed, {moved} services changed)",
            services * per
        ),
        format!(
            "{expect} deltas delivered in median {:.0} ms (max {:.0} ms; includes the 500 ms file poll), {:.0} ms CPU per edit",
            lat[lat.len() / 2],
            lat[lat.len() - 1],
            cpu[cpu.len() / 2]
        ),
    );
    row(
        "RSS at the end",
        format!("{:.1} MiB", rss_kib(pid) as f64 / 1024.0),
    );
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
    if !quick {
        let out = workspace().join("benches/results/control.md");
        let text = format!(
            "# Control plane: {services} services × {per} endpoints, {proxies} proxies\n\nMade by `cargo run -p benches --release -- control` (remora control pinned to CPU 0, the proxies' client code on CPU 1).\n\n| measure | result |\n|---|---|\n{report}"
        );
        std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
