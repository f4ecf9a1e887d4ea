//! remora's data plane, as a library: bind a [`Proxy`] from a [`Config`] and run it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), remora_proxy::Error> {
//! let proxy = remora_proxy::Proxy::bind(remora_proxy::Config::default()).await?;
//! println!("admin on {}", proxy.admin_addr());
//! proxy.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```

pub mod admin;
mod backoff;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod decide;
pub mod detect;
pub mod discover;
pub mod drain;
pub mod endpoint;
pub mod forward;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod io;
pub mod job;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod panics;
mod random;
pub mod replay;
pub mod scrub;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, EndpointSpec, MtlsMode, StaticDestination};
pub use metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{knob} {addr}: cannot listen: {source}; choose a free port or stop what holds it")]
    Bind {
        knob: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Starts a shutdown from anywhere (another task, an embedding application).
#[derive(Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// What a finished run reports.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Connections still open at the drain deadline, cut.
    pub cut: usize,
}

/// A bound, not yet running proxy.
pub struct Proxy {
    cfg: Config,
    inbound: TcpListener,
    outbound: TcpListener,
    admin: TcpListener,
    addrs: [SocketAddr; 3],
    admin_state: Arc<admin::AdminState>,
    destinations: Arc<discover::Destinations>,
}

async fn bind(knob: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { knob, addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| Error::Bind { knob, addr, source })?;
    Ok((l, local))
}

impl Proxy {
    /// Validates the configuration and binds every listener (port 0 picks a free port).
    pub async fn bind(cfg: Config) -> Result<Proxy, Error> {
        cfg.validate().map_err(Error::Config)?;
        let (inbound, i) = bind("REMORA_INBOUND_ADDR", cfg.inbound_addr).await?;
        let (outbound, o) = bind("REMORA_OUTBOUND_ADDR", cfg.outbound_addr).await?;
        let (admin, a) = bind("REMORA_ADMIN_ADDR", cfg.admin_addr).await?;
        let metrics = Arc::new(Metrics::new());
        let identity = cfg
            .identity_dir
            .as_deref()
            .map(|dir| match &cfg.identity_mode {
                config::IdentityMode::Files => identity::IdentityStore::new(dir, metrics.clone()),
                config::IdentityMode::Control { id, token } => {
                    identity::IdentityStore::with_certifier(
                        dir,
                        metrics.clone(),
                        identity::Certifier {
                            id: id.clone(),
                            token: token.clone(),
                            client: Default::default(),
                        },
                    )
                }
            });
        let mut destinations = discover::Destinations::new(
            &cfg.destinations,
            cfg.connect_timeout,
            metrics.clone(),
            identity.clone(),
        );
        if let (Some(target), Some(store)) = (&cfg.control, &identity) {
            let td = {
                let store = Arc::downgrade(store);
                Arc::new(move || store.upgrade().and_then(|s| s.trust_domain()))
            };
            let client =
                control::ControlClient::new(target, store.ca_path(), td).map_err(Error::Config)?;
            if let Some(c) = store.certifier() {
                let _ = c.client.set(client.clone());
            }
            destinations = destinations.with_control(client, cfg.discovery_idle_timeout);
        }
        let destinations = Arc::new(destinations);
        let admin_state = Arc::new(admin::AdminState {
            metrics,
            identity,
            ready: Default::default(),
            draining: Default::default(),
            shutdown: CancellationToken::new(),
        });
        Ok(Proxy {
            cfg,
            inbound,
            outbound,
            admin,
            addrs: [i, o, a],
            admin_state,
            destinations,
        })
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.addrs[1]
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs[2]
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.admin_state.metrics.clone()
    }

    /// The outbound destinations, to change static endpoint sets while the proxy runs (requests
    /// in flight are not disturbed).
    pub fn destinations(&self) -> Arc<discover::Destinations> {
        self.destinations.clone()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.admin_state.shutdown.clone())
    }

    /// Serves until `signal` resolves or a shutdown is requested, then drains: inbound first
    /// (the app's callers), while the app's own outbound calls keep working, then outbound.
    /// Returns once nothing is in flight or the drain deadline has passed.
    pub async fn run(self, signal: impl Future<Output = ()>) -> RunReport {
        let state = self.admin_state.clone();
        let metrics = state.metrics.clone();
        let rules = Arc::new(scrub::Rules::new(&self.cfg.strip_headers));
        let (in_drain, out_drain) = (drain::Drain::new(), drain::Drain::new());
        let mut identity_task = None;
        let mut inbound =
            inbound::listener(&self.cfg, metrics.clone(), in_drain.clone(), rules.clone());
        if let Some(store) = &state.identity {
            inbound.tls = Some(listener::InboundTls {
                store: store.clone(),
                mode: self.cfg.mtls,
                probe_paths: Arc::new(self.cfg.probe_paths.clone()),
            });
            identity_task = Some(tokio::spawn(store.clone().watch()));
        }
        let inbound = Arc::new(inbound);
        let outbound = Arc::new(outbound::listener(
            &self.cfg,
            self.destinations.clone(),
            metrics.clone(),
            out_drain.clone(),
            rules,
            vec![self.addrs[1], self.addrs[2]],
        ));
        tokio::spawn(inbound.serve(self.inbound, in_drain.clone()));
        tokio::spawn(outbound.serve(self.outbound, out_drain.clone()));
        // Bursts (many connections, large bodies) leave freed heap in glibc's arenas; hand it
        // back to the system so RSS returns to idle after the burst (cheap on a small heap).
        #[cfg(target_env = "gnu")]
        let trim = tokio::spawn(async {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                tick.tick().await;
                // SAFETY: malloc_trim only walks the allocator's own free lists.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
        let stop_admin = CancellationToken::new();
        tokio::spawn(admin::serve(self.admin, state.clone(), stop_admin.clone()));
        state.ready.store(true, Ordering::Release);
        metrics.ready.set(1);
        tracing::info!(inbound = %self.addrs[0], outbound = %self.addrs[1], admin = %self.addrs[2],
            app = %self.cfg.app_addr, "remora-proxy ready");

        tokio::select! {
            _ = signal => {}
            _ = state.shutdown.cancelled() => {}
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.cfg.drain_timeout;
        state.draining.store(true, Ordering::Release);
        metrics.ready.set(0);
        metrics.draining.set(1);
        let requests: i64 = [metrics::Direction::Inbound, metrics::Direction::Outbound]
            .into_iter()
            .map(|direction| {
                metrics
                    .requests_in_flight
                    .get_or_create(&metrics::DirectionLabels { direction })
                    .get()
            })
            .sum();
        let connections = in_drain.in_flight() + out_drain.in_flight();
        metrics.drain_connections.set(connections as i64);
        metrics.drain_requests.set(requests);
        tracing::info!(
            inbound_connections = in_drain.in_flight(),
            outbound_connections = out_drain.in_flight(),
            requests_in_flight = requests,
            timeout = ?self.cfg.drain_timeout,
            "draining"
        );
        // Inbound first: the app keeps its outbound calls while its callers finish.
        let mut cut = in_drain.finish(deadline).await;
        cut += out_drain.finish(deadline).await;
        metrics.drain_cut.set(cut as i64);
        stop_admin.cancel();
        // Nothing of this proxy outlives its run (embedders may keep the runtime going).
        self.destinations.stop();
        if let Some(t) = identity_task {
            t.abort();
        }
        #[cfg(target_env = "gnu")]
        trim.abort();
        if cut > 0 {
            tracing::warn!(
                cut,
                "drain deadline reached; cut connections still in flight"
            );
        } else {
            tracing::info!(elapsed = ?started.elapsed(), "drained");
        }
        RunReport { cut }
    }
}
