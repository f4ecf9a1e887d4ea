//! The `remora` command line. `main.rs` only calls [`main`].

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "remora", version, about = "remora: a small service mesh")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a local mesh on loopback: three gRPC backends behind their own proxies, a client
    /// calling them through its proxy; print what happened.
    Demo(DemoArgs),
    /// Run the control plane: endpoint discovery (from a file or Kubernetes EndpointSlices)
    /// and workload certificate issuance, over TLS.
    Control(Box<ControlArgs>),
    /// Certificate authority: `remora ca init --trust-domain D --out DIR`.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Workload certificates: `issue` and `inspect`.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Add the remora sidecar to Kubernetes YAML (Deployment, StatefulSet, DaemonSet,
    /// ReplicaSet, Job, CronJob, Pod, List): `remora inject app.yaml | kubectl apply -f -`.
    Inject(InjectArgs),
    /// Print every object remora needs in a cluster (no CRD):
    /// `remora install --ca DIR | kubectl apply -f -`.
    Install(InstallArgs),
    /// Diagnose a meshed pod, each finding with its fix; exits non-zero on any error. Give
    /// any of: --proxy, --identity-dir, --control, --manifest, --local, --cluster.
    Check(CheckArgs),
    /// The requests passing one proxy, live, one line each:
    /// `remora tap --proxy 127.0.0.1:4191 --path /api`.
    Tap(crate::tap::TapArgs),
    /// A terminal view of the busiest routes and endpoints of one or more proxies:
    /// `remora top --proxy 127.0.0.1:4191[,…]`.
    Top(crate::top::TopArgs),
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// A proxy's admin address (its readiness and the reason when not ready).
    #[arg(long)]
    pub proxy: Option<std::net::SocketAddr>,
    /// An identity directory (tls.crt, tls.key, ca.crt): expiry, chain, key.
    #[arg(long)]
    pub identity_dir: Option<std::path::PathBuf>,
    /// A control plane (HOST:PORT) to send a real Certify call to: reachable, token accepted,
    /// clock skew. Needs --token; the identity and bundle come from --identity-dir unless given.
    #[arg(long)]
    pub control: Option<String>,
    #[arg(long)]
    pub token: Option<std::path::PathBuf>,
    /// The SPIFFE ID to ask the control plane for.
    #[arg(long)]
    pub identity: Option<String>,
    #[arg(long)]
    pub trust_bundle: Option<std::path::PathBuf>,
    /// A manifest file (`-` for standard input): injection, port clashes, probes under strict
    /// mTLS, drain against the grace period.
    #[arg(long)]
    pub manifest: Option<String>,
    /// This network namespace: interception rules and where the application listens.
    #[arg(long)]
    pub local: bool,
    /// With --local: the application's ports (comma-separated); default every listening port.
    #[arg(long, value_delimiter = ',')]
    pub app_ports: Vec<u16>,
    /// The cluster in --kubeconfig (or KUBECONFIG, or in-cluster): control plane, webhook,
    /// and the pods of labelled namespaces.
    #[arg(long)]
    pub cluster: bool,
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
}

async fn check_command(a: CheckArgs) -> ExitCode {
    use crate::check;
    let mut findings = Vec::new();
    let mut asked = false;
    if let Some(dir) = &a.identity_dir {
        asked = true;
        findings.extend(check::identity::identity_dir(
            dir,
            std::time::SystemTime::now(),
        ));
    }
    if let Some(addr) = a.proxy {
        asked = true;
        findings.extend(check::remote::proxy_admin(addr).await);
    }
    if let Some(addr) = &a.control {
        asked = true;
        let dir_file = |f: &str| a.identity_dir.as_ref().map(|d| d.join(f));
        let bundle = a.trust_bundle.clone().or_else(|| dir_file("ca.crt"));
        let identity = match &a.identity {
            Some(id) => id
                .parse::<remora_certs::SpiffeId>()
                .map_err(|e| format!("--identity {id}: {e}")),
            None => dir_file("tls.crt")
                .and_then(|f| std::fs::read(&f).ok().map(|pem| (f, pem)))
                .and_then(|(f, pem)| remora_certs::validate::parse_certs(&f, &pem).ok())
                .and_then(|c| c.first().and_then(|l| remora_certs::validate::spiffe_id(l)))
                .ok_or_else(|| {
                    "--control needs --identity (or an --identity-dir whose tls.crt names one)"
                        .to_string()
                }),
        };
        match (identity, bundle, &a.token) {
            (Ok(identity), Some(bundle), Some(token)) => {
                findings.extend(
                    check::remote::control(check::remote::ControlCheck {
                        addr: addr.clone(),
                        bundle,
                        identity,
                        token_file: token.clone(),
                    })
                    .await,
                );
            }
            (Err(e), _, _) => {
                eprintln!("remora check: {e}");
                return ExitCode::from(2);
            }
            (_, None, _) => {
                eprintln!(
                    "remora check: --control needs --trust-bundle (or --identity-dir with ca.crt)"
                );
                return ExitCode::from(2);
            }
            (_, _, None) => {
                eprintln!(
                    "remora check: --control needs --token FILE (the proxy's REMORA_IDENTITY_TOKEN)"
                );
                return ExitCode::from(2);
            }
        }
    }
    if let Some(file) = &a.manifest {
        asked = true;
        use std::io::Read as _;
        let mut text = String::new();
        let read = if file == "-" {
            std::io::stdin().read_to_string(&mut text).map(drop)
        } else {
            std::fs::read_to_string(file).map(|t| text = t)
        };
        match read {
            Ok(()) => findings.extend(check::manifest::manifest(&text)),
            Err(e) => {
                eprintln!("remora check: cannot read {file}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if a.local {
        asked = true;
        findings.extend(check::local::gather(&a.app_ports));
    }
    if a.cluster {
        asked = true;
        match crate::server::kube_client(a.kubeconfig.as_ref()).await {
            Ok(client) => findings.extend(check::cluster::cluster(client).await),
            Err(e) => findings.push(check::Finding::error(
                "cluster",
                e,
                "pass --kubeconfig, or run inside the cluster",
            )),
        }
    }
    if !asked {
        eprintln!(
            "remora check: say what to check: --proxy ADMIN_ADDR, --identity-dir DIR, --control ADDR --token FILE, --manifest FILE, --local, or --cluster"
        );
        return ExitCode::from(2);
    }
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == check::Severity::Error)
        .count();
    let warnings = findings
        .iter()
        .filter(|f| f.severity == check::Severity::Warning)
        .count();
    println!("{errors} error(s), {warnings} warning(s)");
    if check::failed(&findings) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// A directory made by `remora ca init` (its ca.crt, issuer.crt and issuer.key go into the
    /// Secret; root.key never does). Without it a CA is made on the spot, with a warning.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The control plane image.
    #[arg(long, default_value = concat!("ghcr.io/remora-mesh/remora:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The proxy image the webhook injects.
    #[arg(long, default_value = concat!("ghcr.io/remora-mesh/remora-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// The cluster's Kubernetes version (MAJOR.MINOR): picks the PodDisruptionBudget API and
    /// whether pods get a native sidecar (1.29 and later).
    #[arg(long, default_value = "1.29")]
    pub kube_version: String,
    /// Call the webhook at this URL instead of through the control plane Service.
    #[arg(long)]
    pub webhook_url: Option<String>,
}

fn install_command(a: InstallArgs) -> ExitCode {
    let minor = a
        .kube_version
        .strip_prefix("1.")
        .and_then(|m| m.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    let Some(kube_minor) = minor else {
        eprintln!(
            "remora install: --kube-version {} is not MAJOR.MINOR like 1.29",
            a.kube_version
        );
        return ExitCode::from(2);
    };
    let ca = match &a.ca {
        Some(dir) => {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f)).map_err(|e| {
                    format!(
                        "cannot read {}: {e} (is {} a `remora ca init` directory?)",
                        dir.join(f).display(),
                        dir.display()
                    )
                })
            };
            match (read("ca.crt"), read("issuer.crt"), read("issuer.key")) {
                (Ok(ca_crt), Ok(issuer_crt), Ok(issuer_key)) => {
                    // The issuer must sign what the bundle trusts, or every proxy would fail.
                    if let Err(e) = remora_certs::ca::LoadedIssuer::from_dir(dir) {
                        eprintln!("remora install: {}: {e}", dir.display());
                        return ExitCode::FAILURE;
                    }
                    crate::install::CaFiles {
                        ca_crt,
                        issuer_crt,
                        issuer_key,
                    }
                }
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    eprintln!("remora install: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => match remora_certs::ca::new_ca(&a.trust_domain) {
            Ok(ca) => {
                eprintln!(
                    "remora install: warning: no --ca, so a CA was made on the spot and its root key was thrown away: \
                     the issuer cannot be renewed under the same root when it expires in a year. For a cluster you keep, \
                     run `remora ca init --out DIR`, keep DIR/root.key offline, and pass --ca DIR. \
                     The trust bundle is in Secret remora/remora-ca (ca.crt)."
                );
                crate::install::CaFiles {
                    ca_crt: ca.root_crt,
                    issuer_crt: ca.issuer_crt,
                    issuer_key: ca.issuer_key,
                }
            }
            Err(e) => {
                eprintln!("remora install: cannot make a CA: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    print!(
        "{}",
        crate::install::manifests(&crate::install::Settings {
            ca,
            trust_domain: a.trust_domain,
            cluster_domain: a.cluster_domain,
            control_image: a.image,
            proxy_image: a.proxy_image,
            kube_minor,
            webhook_url: a.webhook_url,
        })
    );
    ExitCode::SUCCESS
}

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// The YAML file, or `-` for standard input.
    #[arg(default_value = "-")]
    pub file: String,
    /// The mesh's PEM trust bundle (the ca.crt of `remora ca init`).
    #[arg(long)]
    pub trust_bundle: Option<std::path::PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Where proxies reach the control plane.
    #[arg(long, default_value = crate::inject::DEFAULT_CONTROL_ADDR)]
    pub control_addr: String,
    #[arg(long, default_value = concat!("ghcr.io/remora-mesh/remora-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// The proxy as a regular container (clusters older than 1.29, without native sidecars).
    #[arg(long)]
    pub classic: bool,
}

fn inject_command(a: InjectArgs) -> ExitCode {
    use std::io::Read as _;
    let Some(bundle_path) = &a.trust_bundle else {
        eprintln!(
            "remora inject: --trust-bundle is required: pass the ca.crt of `remora ca init` (e.g. --trust-bundle ca/ca.crt)"
        );
        return ExitCode::from(2);
    };
    let trust_bundle = match std::fs::read_to_string(bundle_path) {
        Ok(t) if t.contains("-----BEGIN CERTIFICATE-----") => t,
        Ok(_) => {
            eprintln!(
                "remora inject: {} holds no PEM certificate; pass the ca.crt of `remora ca init`",
                bundle_path.display()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("remora inject: cannot read {}: {e}", bundle_path.display());
            return ExitCode::from(2);
        }
    };
    let mut input = String::new();
    let read = if a.file == "-" {
        std::io::stdin().read_to_string(&mut input).map(|_| ())
    } else {
        std::fs::read_to_string(&a.file).map(|t| input = t)
    };
    if let Err(e) = read {
        eprintln!("remora inject: cannot read {}: {e}", a.file);
        return ExitCode::from(2);
    }
    let s = crate::inject::Settings {
        trust_bundle,
        trust_domain: a.trust_domain,
        control_addr: a.control_addr,
        proxy_image: a.proxy_image,
        classic: a.classic,
    };
    match crate::inject::inject_yaml(&input, &s) {
        Ok((out, notes)) => {
            for n in notes {
                eprintln!("remora inject: {n}");
            }
            print!("{out}");
            ExitCode::SUCCESS
        }
        // Nothing is written on an error: the output is all or nothing.
        Err(e) => {
            eprintln!("remora inject: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Make a trust anchor (root) and an issuer: ca.crt, root.key, issuer.crt, issuer.key.
    Init {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Issue a workload certificate into DIR as tls.crt, tls.key and ca.crt.
    Issue {
        /// spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT
        #[arg(long)]
        identity: String,
        /// A directory made by `remora ca init`.
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
    /// Print a certificate file: subject, SANs, validity, and whether it verifies to the
    /// ca.crt next to it.
    Inspect { file: std::path::PathBuf },
}

fn certs_command(cmd: Command) -> ExitCode {
    use remora_certs::ca;
    let result: Result<String, String> = match cmd {
        Command::Ca(CaCommand::Init { trust_domain, out }) => ca::init_dir(&out, &trust_domain)
            .map(|()| format!("wrote a CA for {trust_domain} to {}: ca.crt (trust bundle), root.key (keep offline), issuer.crt, issuer.key", out.display()))
            .map_err(|e| e.to_string()),
        Command::Cert(CertCommand::Issue { identity, ca: dir, out, lifetime }) => (|| {
            let id: remora_certs::SpiffeId = identity.parse().map_err(|e: remora_certs::identity::ParseError| e.to_string())?;
            let issuer = ca::LoadedIssuer::from_dir(&dir).map_err(|e| format!("{e} (is {} a `remora ca init` directory?)", dir.display()))?;
            let leaf = ca::issue_with_new_key(&issuer, &id, lifetime).map_err(|e| e.to_string())?;
            leaf.write(&out).map_err(|e| e.to_string())?;
            Ok(format!("issued {id} (valid {}) to {}: tls.crt, tls.key, ca.crt", humantime::format_duration(lifetime), out.display()))
        })(),
        Command::Cert(CertCommand::Inspect { file }) => remora_certs::validate::inspect(&file).map_err(|e| e.to_string()),
        Command::Demo(_)
        | Command::Control(_)
        | Command::Inject(_)
        | Command::Install(_)
        | Command::Check(_)
        | Command::Tap(_)
        | Command::Top(_) => {
            Err("not a certificate command".into())
        }
    };
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("remora: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Where proxies reach the gRPC APIs (TLS).
    #[arg(long, env = "REMORA_CONTROL_LISTEN", default_value = "0.0.0.0:8086")]
    pub addr: std::net::SocketAddr,
    /// /live, /ready and /metrics (plaintext HTTP).
    #[arg(
        long,
        env = "REMORA_CONTROL_ADMIN_ADDR",
        default_value = "0.0.0.0:9996"
    )]
    pub admin_addr: std::net::SocketAddr,
    /// A directory made by `remora ca init`: issuer.crt, issuer.key, ca.crt (hot reloaded).
    #[arg(long, env = "REMORA_ISSUER_DIR")]
    pub issuer: std::path::PathBuf,
    #[arg(long, env = "REMORA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The control plane's own SPIFFE ID [default: spiffe://TRUST_DOMAIN/ns/remora/sa/control].
    #[arg(long)]
    pub identity: Option<String>,
    /// Serve endpoints from this TOML file (hot reloaded) instead of Kubernetes.
    #[arg(long, env = "REMORA_ENDPOINTS_FILE", conflicts_with = "kubernetes")]
    pub endpoints_file: Option<std::path::PathBuf>,
    /// Watch Kubernetes EndpointSlices (in-cluster configuration, or --kubeconfig).
    #[arg(long)]
    pub kubernetes: bool,
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Bootstrap tokens for machines without Kubernetes: `TOKEN SPIFFE-ID` per line.
    #[arg(long, env = "REMORA_BOOTSTRAP_TOKENS")]
    pub bootstrap_tokens: Option<std::path::PathBuf>,
    /// Check ServiceAccount tokens with a Kubernetes TokenReview.
    #[arg(long)]
    pub token_review: bool,
    /// The API server for TokenReviews, when not the one --kubeconfig names.
    #[arg(long)]
    pub token_review_kubeconfig: Option<std::path::PathBuf>,
    /// Audiences a ServiceAccount token must carry (repeatable).
    #[arg(long)]
    pub token_audience: Vec<String>,
    /// Lifetime of the workload certificates issued.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,
    /// gRPC connections open at once [default: 4096, or 3/4 of the descriptor limit if lower].
    #[arg(long, env = "REMORA_CONTROL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// gRPC connections open at once from one client IP.
    #[arg(long, env = "REMORA_CONTROL_MAX_CONNECTIONS_PER_PEER", default_value_t = crate::server::DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    pub max_connections_per_peer: usize,
    /// Discovery watches open at once, over all connections.
    #[arg(long, env = "REMORA_CONTROL_MAX_WATCHES", default_value_t = crate::server::DEFAULT_MAX_WATCHES)]
    pub max_watches: usize,
    /// Serve the sidecar injection webhook (HTTPS, path /inject) here; off when absent.
    #[arg(long, env = "REMORA_WEBHOOK_ADDR")]
    pub webhook_addr: Option<std::net::SocketAddr>,
    /// Another name (DNS or IP) for the webhook certificate, beside the control plane
    /// Service's names; for a webhook configuration that names a URL (repeatable).
    #[arg(long)]
    pub webhook_san: Vec<String>,
    /// The proxy image the webhook injects.
    #[arg(long, default_value = concat!("ghcr.io/remora-mesh/remora-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// The webhook injects the proxy as a regular container (clusters older than 1.29).
    #[arg(long)]
    pub inject_classic: bool,
}

impl ControlArgs {
    pub fn options(self) -> Result<crate::server::Options, String> {
        use crate::server::{Options, Source};
        let source = match (self.endpoints_file, self.kubernetes) {
            (Some(f), _) => Source::File(f),
            (None, true) => Source::Kubernetes {
                kubeconfig: self.kubeconfig.clone(),
                cluster_domain: self.cluster_domain,
            },
            (None, false) => {
                return Err(
                    "choose an endpoint source: --endpoints-file PATH or --kubernetes".into(),
                );
            }
        };
        if self.bootstrap_tokens.is_none() && !self.token_review {
            return Err(
                "choose how tokens are checked: --bootstrap-tokens PATH and/or --token-review"
                    .into(),
            );
        }
        let mut o = Options::new(self.issuer, source);
        o.addr = self.addr;
        o.admin_addr = self.admin_addr;
        o.trust_domain = self.trust_domain;
        o.identity = match self.identity {
            Some(id) => Some(id.parse().map_err(|e| format!("--identity {id}: {e}"))?),
            None => None,
        };
        o.bootstrap_tokens = self.bootstrap_tokens;
        o.token_review = self
            .token_review
            .then(|| self.token_review_kubeconfig.or(self.kubeconfig));
        o.token_audiences = self.token_audience;
        if self.cert_lifetime < Duration::from_secs(5) {
            return Err("--cert-lifetime must be at least 5s".into());
        }
        o.cert_lifetime = self.cert_lifetime;
        o.limits.connections = self.max_connections;
        o.limits.connections_per_peer = self.max_connections_per_peer;
        o.limits.watches = self.max_watches;
        o.webhook = self.webhook_addr.map(|addr| crate::server::WebhookOptions {
            addr,
            extra_names: self.webhook_san,
            proxy_image: self.proxy_image,
            classic: self.inject_classic,
        });
        Ok(o)
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// gRPC calls the client makes.
    #[arg(long, default_value = "3000")]
    pub requests: usize,
    /// Calls in flight at once (all on one HTTP/2 connection, like a gRPC channel).
    #[arg(long, default_value = "16")]
    pub concurrency: usize,
    /// After the run, keep the mesh up until Ctrl-C (to look at the admin URLs).
    #[arg(long)]
    pub hold: bool,
    /// Run the mesh without mTLS (by default it makes a throwaway CA and identities).
    #[arg(long)]
    pub plaintext: bool,
    /// Upper bound on the whole run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Control(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = std::env::var("REMORA_LOG").unwrap_or_else(|_| default_log.into());
    if let Err(e) = init_logging(&filter) {
        eprintln!("remora: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remora: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        cmd @ (Command::Ca(_) | Command::Cert(_)) => certs_command(cmd),
        Command::Inject(a) => inject_command(a),
        Command::Install(a) => install_command(a),
        Command::Check(a) => runtime.block_on(check_command(a)),
        Command::Top(a) => match crate::top::run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("remora top: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Tap(a) => match runtime.block_on(crate::tap::run(a)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("remora tap: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Control(args) => runtime.block_on(async move {
            let stop = shutdown_signal();
            let cp = match (*args).options() {
                Ok(o) => crate::server::ControlPlane::bind(o).await,
                Err(e) => Err(e),
            };
            match cp {
                Ok(cp) => {
                    cp.run(stop).await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("remora control: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Demo(args) => runtime.block_on(async move {
            match crate::demo::run(args).await {
                Ok(report) if report.failed == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("remora demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

// The two helpers below follow the proxy's (proxy/src/cli.rs), so both binaries log and stop
// alike; they are copies rather than shared so the control plane needs the proxy library only
// for `remora demo`, and remora-certs stays free of tracing-subscriber and tokio.

/// Installs the global tracing subscriber. `filter` is a level or tracing directives.
fn init_logging(filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
        format!(
            "REMORA_LOG `{filter}` is not a log filter ({e}); use a level such as info or debug"
        )
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}

/// Installs the SIGTERM and SIGINT handlers at once and returns a future that resolves on the
/// first of them; a second one exits the process at once. Called before the control plane
/// binds: handlers installed only when the future is first polled (inside `run`, after the
/// listeners are up) leave a moment where a SIGTERM sent as soon as /ready answers meets the
/// default action and kills the process instead of stopping it (seen in tests/cli.rs).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            let (Ok(mut term), Ok(mut int)) = handlers else {
                tracing::error!(
                    "cannot install signal handlers; the control plane stops only when killed (SIGKILL)"
                );
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
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
