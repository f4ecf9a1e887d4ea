//! The `remora-proxy` command line: flags and `REMORA_*` variables → [`Config`], logging, the
//! runtime, and signals. `main.rs` only calls [`main`].

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use remora_proxy::{Config, StaticDestination};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MtlsArg {
    Permissive,
    Strict,
    Disabled,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TransportArg {
    Auto,
    Quic,
    Tcp,
}

#[derive(Parser, Debug)]
#[command(name = "remora-proxy", version, about = "remora's sidecar proxy")]
pub struct Args {
    /// Listener for traffic to the local app (peers, probes, everything from outside).
    #[arg(long, env = "REMORA_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,
    /// Where the local app listens: IP:PORT, or unix:PATH for a Unix domain socket.
    #[arg(long, env = "REMORA_APP_ADDR", default_value = "127.0.0.1:8080")]
    pub app_addr: String,
    /// Listener for the app's outbound calls (explicit HTTP proxy): IP:PORT, optionally
    /// followed by `,unix:PATH` to listen on a Unix domain socket too.
    #[arg(long, env = "REMORA_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    pub outbound_addr: String,
    /// Admin server: /live, /ready, /metrics, POST /shutdown.
    #[arg(long, env = "REMORA_ADMIN_ADDR", default_value = "0.0.0.0:4191")]
    pub admin_addr: SocketAddr,
    /// Static destination NAME:PORT=IP:PORT[#SPIFFE-ID[+quic[:UDP-PORT]]][*WEIGHT][,…];
    /// repeatable. The variable takes several separated by `;`. An endpoint with an identity is
    /// reached over mTLS; `+quic` says its proxy also serves HTTP/3 over QUIC on the UDP port
    /// of the same number (`+quic:UDP-PORT`: on that one), and needs the identity.
    #[arg(long = "destination", env = "REMORA_DESTINATIONS", value_delimiter = ';',
          value_parser = parse_destination)]
    pub destinations: Vec<StaticDestination>,
    /// Ports whose traffic skips protocol detection (server-speaks-first protocols).
    #[arg(
        long,
        env = "REMORA_OPAQUE_PORTS",
        value_delimiter = ',',
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    pub opaque_ports: Vec<u16>,
    /// How long to wait for a client's first bytes before treating the connection as opaque.
    #[arg(long, env = "REMORA_DETECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// Headers (or `prefix*`) stripped from requests and responses in both directions.
    #[arg(
        long,
        env = "REMORA_STRIP_HEADERS",
        value_delimiter = ',',
        default_value = "x-envoy-*,x-remora-*"
    )]
    pub strip_headers: Vec<String>,
    /// How long a shutdown waits for in-flight requests before cutting them.
    #[arg(long, env = "REMORA_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Directory with tls.crt, tls.key, ca.crt (a Kubernetes TLS Secret); enables mTLS.
    #[arg(long, env = "REMORA_IDENTITY_DIR")]
    pub identity_dir: Option<std::path::PathBuf>,
    /// Inbound mTLS: permissive (mTLS and plaintext on one port), strict, or disabled.
    #[arg(long, env = "REMORA_MTLS", value_enum, default_value = "permissive")]
    pub mtls: MtlsArg,
    /// Strict mode: plaintext HTTP/1.1 GET/HEAD to these paths (kubelet probes) is still served;
    /// empty refuses all plaintext.
    #[arg(
        long,
        env = "REMORA_PROBE_PATHS",
        value_delimiter = ',',
        default_value = "/healthz,/readyz,/livez,/health,/ready,/live"
    )]
    pub probe_paths: Vec<String>,
    /// The control plane, `host:port[,host:port…][#spiffe-id]` (replicas, tried in turn):
    /// endpoint discovery for destinations that are not static, and certificates in
    /// REMORA_IDENTITY_MODE=control.
    #[arg(long, env = "REMORA_CONTROL_ADDR")]
    pub control_addr: Option<remora_proxy::ControlTarget>,
    /// Where the certificate comes from: `files` (REMORA_IDENTITY_DIR, written by someone
    /// else) or `control` (a CSR to the control plane, renewed automatically).
    #[arg(
        long,
        env = "REMORA_IDENTITY_MODE",
        value_enum,
        default_value = "files"
    )]
    pub identity_mode: IdentityModeArg,
    /// This proxy's SPIFFE ID, for REMORA_IDENTITY_MODE=control.
    #[arg(long, env = "REMORA_IDENTITY")]
    pub identity: Option<String>,
    /// A file holding the token that proves REMORA_IDENTITY (a projected ServiceAccount token
    /// or a bootstrap token); re-read at every renewal.
    #[arg(
        long,
        env = "REMORA_IDENTITY_TOKEN",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub identity_token: std::path::PathBuf,
    /// Log filter: a level (info, debug…) or tracing directives (remora_proxy=debug,info).
    #[arg(long, env = "REMORA_LOG", default_value = "info")]
    pub log: String,
    /// Log output format.
    #[arg(long, env = "REMORA_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// Access log on standard output, one JSON line per request (tap's fields, no header
    /// values outside content-type and user-agent): off, on, or the fraction of requests to
    /// log (e.g. 0.01).
    #[arg(long, env = "REMORA_ACCESS_LOG", default_value = "off", value_parser = parse_access_log)]
    pub access_log: AccessLogArg,
    /// An OpenTelemetry collector's OTLP/gRPC address (host:port): sampled requests (a
    /// `traceparent` with the sampled flag) get a span each, exported there. Unset, trace
    /// headers pass untouched.
    #[arg(long, env = "REMORA_TRACE_COLLECTOR")]
    pub trace_collector: Option<String>,
    /// The transport to peer proxies: auto (HTTP/3 over QUIC to endpoints that advertise it,
    /// TCP + mTLS to the rest), quic (try QUIC for every endpoint with an identity), tcp.
    /// QUIC falls back to TCP when its handshake does not complete in time.
    #[arg(long, env = "REMORA_MESH_TRANSPORT", value_enum, default_value = "tcp")]
    pub mesh_transport: TransportArg,
    /// Runtime worker threads; 1 runs a single-threaded runtime (the light default).
    #[arg(long, env = "REMORA_THREADS", default_value = "1")]
    pub threads: usize,
    #[command(subcommand)]
    pub command: Option<Sub>,
}

/// `REMORA_ACCESS_LOG`: the fraction of requests logged, `None` for off.
#[derive(Clone, Copy, Debug)]
pub struct AccessLogArg(pub Option<f64>);

fn parse_access_log(s: &str) -> Result<AccessLogArg, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" | "false" | "0" | "" => Ok(AccessLogArg(None)),
        "on" | "true" | "1" => Ok(AccessLogArg(Some(1.0))),
        other => match other.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => Ok(AccessLogArg(Some(f))),
            _ => Err(format!(
                "{s:?} is not on, off or a fraction of requests above 0 and at most 1 (e.g. 0.01)"
            )),
        },
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum IdentityModeArg {
    Files,
    Control,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Wait for the local proxy to be ready, run CMD, then stop the proxy; exit with CMD's
    /// status. For Jobs and CronJobs: `remora-proxy await -- ./my-job --flag`.
    Await {
        /// How long to wait for the proxy's /ready.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Program this network namespace so the app's TCP goes through the proxy (iptables
    /// `nat` chains REMORA_INBOUND / REMORA_OUTBOUND; the injected pod's init container).
    Init(crate::init::InitArgs),
}

fn parse_destination(s: &str) -> Result<StaticDestination, String> {
    s.parse().map_err(|e| format!("REMORA_DESTINATIONS: {e}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 10s or 500ms"))
}

impl Args {
    pub fn config(&self) -> Result<Config, String> {
        let identity_mode = match (self.identity_mode, &self.identity) {
            (IdentityModeArg::Files, _) => remora_proxy::IdentityMode::Files,
            (IdentityModeArg::Control, None) => {
                return Err("REMORA_IDENTITY_MODE=control needs REMORA_IDENTITY (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)".into());
            }
            (IdentityModeArg::Control, Some(id)) => remora_proxy::IdentityMode::Control {
                id: id
                    .parse()
                    .map_err(|e| format!("REMORA_IDENTITY `{id}`: {e}"))?,
                token: self.identity_token.clone(),
            },
        };
        let (app_addr, app_unix) = match self.app_addr.strip_prefix("unix:") {
            Some(path) => (
                Config::default().app_addr,
                Some(unix_path("REMORA_APP_ADDR", path)?),
            ),
            None => (
                self.app_addr.parse().map_err(|_| {
                    format!(
                        "REMORA_APP_ADDR `{}`: expected IP:PORT (e.g. 127.0.0.1:8080) or unix:PATH",
                        self.app_addr
                    )
                })?,
                None,
            ),
        };
        let mut outbound_addr = None;
        let mut outbound_unix = None;
        for part in self.outbound_addr.split(',').map(str::trim) {
            match part.strip_prefix("unix:") {
                Some(path) if outbound_unix.is_none() => {
                    outbound_unix = Some(unix_path("REMORA_OUTBOUND_ADDR", path)?)
                }
                None if outbound_addr.is_none() => {
                    outbound_addr = Some(part.parse().map_err(|_| {
                        format!(
                            "REMORA_OUTBOUND_ADDR `{part}`: expected IP:PORT (e.g. 127.0.0.1:4140), optionally with ,unix:PATH"
                        )
                    })?)
                }
                _ => {
                    return Err(format!(
                        "REMORA_OUTBOUND_ADDR `{}`: give one IP:PORT and at most one unix:PATH",
                        self.outbound_addr
                    ));
                }
            }
        }
        let outbound_addr = outbound_addr.ok_or_else(|| {
            format!(
                "REMORA_OUTBOUND_ADDR `{}` has no IP:PORT; the TCP listener is what interception redirects to",
                self.outbound_addr
            )
        })?;
        Ok(Config {
            control: self.control_addr.clone(),
            app_unix,
            outbound_unix,
            identity_mode,
            inbound_addr: self.inbound_addr,
            app_addr,
            outbound_addr,
            admin_addr: self.admin_addr,
            access_log: self.access_log.0,
            trace_collector: self.trace_collector.clone(),
            destinations: self.destinations.clone(),
            opaque_ports: self.opaque_ports.clone(),
            detect_timeout: self.detect_timeout,
            strip_headers: self.strip_headers.clone(),
            drain_timeout: self.drain_timeout,
            identity_dir: self.identity_dir.clone(),
            probe_paths: self
                .probe_paths
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
            mtls: match self.mtls {
                MtlsArg::Permissive => remora_proxy::MtlsMode::Permissive,
                MtlsArg::Strict => remora_proxy::MtlsMode::Strict,
                MtlsArg::Disabled => remora_proxy::MtlsMode::Disabled,
            },
            mesh_transport: match self.mesh_transport {
                TransportArg::Auto => remora_proxy::MeshTransport::Auto,
                TransportArg::Quic => remora_proxy::MeshTransport::Quic,
                TransportArg::Tcp => remora_proxy::MeshTransport::Tcp,
            },
            ..Config::default()
        })
    }
}

/// Installs the global tracing subscriber. `filter` is a level or tracing directives.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
        format!(
            "REMORA_LOG `{filter}` is not a log filter ({e}); use a level such as info or debug"
        )
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    res.map_err(|e| format!("cannot install the logger: {e}"))
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; stop the proxy with POST /shutdown");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal received; exiting without waiting for the drain");
            std::process::exit(130);
        });
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Sub::Await { timeout, cmd }) = &args.command {
        return crate::job::run(args.admin_addr, *timeout, cmd);
    }
    if let Some(Sub::Init(init)) = &args.command {
        return crate::init::run(init);
    }
    if let Err(e) = init_logging(&args.log, args.log_format) {
        eprintln!("remora-proxy: {e}");
        return ExitCode::from(2);
    }
    if args.threads == 0 {
        eprintln!("remora-proxy: REMORA_THREADS is 0; use 1 (the default) or more");
        return ExitCode::from(2);
    }
    // The threads that carry requests keep freed blocks for reuse (remora_proxy::alloc): this
    // one, where the current-thread runtime runs, or the workers. Not the blocking pool's (up
    // to 512 threads, 256 KiB each): `on_thread_start` would reach them too, so workers opt
    // in when they first park, a hook only workers call.
    let runtime = if args.threads == 1 {
        remora_proxy::alloc::pool_this_thread();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .on_thread_park(remora_proxy::alloc::pool_this_thread)
            .on_thread_stop(remora_proxy::alloc::flush_this_thread)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remora-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("remora-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        let proxy = match remora_proxy::Proxy::bind(cfg).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("remora-proxy: {e}");
                return ExitCode::from(2);
            }
        };
        let report = proxy.run(shutdown_signal()).await;
        if report.cut > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// A Unix socket path from `unix:PATH`: absolute, so it does not depend on the working
/// directory, and within the kernel's 107-byte limit.
fn unix_path(knob: &str, path: &str) -> Result<std::path::PathBuf, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{knob} unix:{path}: the socket path must be absolute (e.g. unix:/run/remora/app.sock)"
        ));
    }
    if path.len() > 107 {
        return Err(format!(
            "{knob} unix:{path}: {} bytes is longer than a Unix socket path may be (107)",
            path.len()
        ));
    }
    Ok(std::path::PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_match_the_library_defaults() {
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        let (cli, lib) = (args.config().unwrap(), Config::default());
        assert_eq!(cli.opaque_ports, Config::default().opaque_ports);
        assert_eq!(cli.strip_headers, lib.strip_headers);
        assert_eq!(cli.inbound_addr, lib.inbound_addr);
        assert_eq!(cli.drain_timeout, lib.drain_timeout);
        assert_eq!(cli.probe_paths, lib.probe_paths);
    }

    #[test]
    fn destinations_from_flags() {
        let args = Args::try_parse_from([
            "remora-proxy",
            "--destination",
            "echo.test:80=127.0.0.1:9001,127.0.0.1:9002;other:81=127.0.0.1:9101",
            "--destination",
            "third:82=127.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(args.destinations.len(), 3);
        let err = Args::try_parse_from(["remora-proxy", "--destination", "bad"]).unwrap_err();
        assert!(err.to_string().contains("NAME:PORT=IP:PORT"), "{err}");
    }
}
