//! The QUIC issue's benchmark: the meshed hop between two proxies (outbound → inbound) over
//! HTTP/3 on QUIC against HTTP/2 on TCP + mTLS, on an emulated link with 5 ms of delay each way
//! and 0, 1 and 3 % packet loss.
//!
//!   cargo run -p benches --release -- quic [--quick] [--secs N] [--transport tcp,quic]
//!       [--loss 0,1,3] [--link auto|netem|tun] [--out DIR]
//!
//! Needs root (network namespaces) and iproute2 (`ip`, `tc`). Not part of `all`.
//!
//! Topology, created for the run and deleted when it ends, on errors too ([`Netns`]'s Drop). The
//! processes in it die with the harness (PR_SET_PDEATHSIG); namespaces left by a killed run are
//! deleted by the next one.
//!
//! ```text
//!   namespace rq-client-PID                        namespace rq-server-PID
//!   load: 100 streams, one h2c connection (CPU 1)  gRPC echo backend 127.0.0.1:8080 (CPU 1)
//!     → outbound proxy 127.0.0.1:15001 (CPU 0)       ↑ inbound proxy 10.77.0.2:15006 (CPU 0)
//!       10.77.0.1/24  ──── 5 ms + N % loss each way ────  10.77.0.2/24
//! ```
//!
//! The link is a veth pair with `tc qdisc replace dev rq0 root netem delay 5ms loss N%` on the
//! egress of both ends: each direction is delayed 5 ms (10 ms round trip) and drops N % of its
//! packets independently. Where the kernel has no sch_netem (`--link auto` probes for it), the
//! same link is emulated in user space: a TUN device in each namespace, the harness forwarding
//! the packets between the two (pinned to CPU 1, SCHED_FIFO), each direction delayed 5 ms in
//! order and dropping N % at random. The report says which one ran, and the round trip measured
//! on the link before the rows (the run stops if it is not about 10 ms).
//!
//! Per transport × loss, two fresh proxies (both with identities; the inbound one with
//! `REMORA_MTLS=strict`; the outbound one with `REMORA_MESH_TRANSPORT=tcp|quic` and the static
//! destination `echo.bench:80=10.77.0.2:15006#<server's SPIFFE ID>`), a warm-up (`--quick`: 1 s,
//! else 3 s), then the counted window (`--quick`: 3 s, else 20 s, `--secs`): a closed loop of
//! 100 concurrent gRPC unary calls over one HTTP/2 connection to the outbound proxy
//! (`benches grpc-closed`, see load.rs), with each proxy's CPU time (/proc/PID/stat) read
//! before and after. The transport is then checked on the outbound proxy's
//! `remora_mesh_connections_total{direction="outbound",transport=…}`: a QUIC row whose
//! `transport="quic"` count stayed 0 (or a proxy without the metric) ends the run with an
//! error, as does a TCP row that counted a QUIC connection.
//!
//! A full run with both transports and the default losses writes `benches/results/quic.md` and
//! `quic-latency.svg`; `--quick` and partial runs write to a temporary directory (named in the
//! output) unless `--out DIR` is given.

use std::fmt::Write as _;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Guard, build_proxy, cpu_seconds};

const CLIENT_IP: &str = "10.77.0.1";
const SERVER_IP: &str = "10.77.0.2";
/// The link's device in both namespaces (veth end or TUN device).
const DEV: &str = "rq0";
/// The same ports in both namespaces (each has its own).
const INBOUND: u16 = 15006;
const OUTBOUND: u16 = 15001;
const ADMIN: u16 = 15020;
const BACKEND: u16 = 8080;
const AUTHORITY: &str = "echo.bench:80";
/// One-way delay, on each direction.
const DELAY: Duration = Duration::from_millis(5);
const STREAMS: u32 = 100;
const DEFAULT_LOSSES: [f64; 3] = [0.0, 1.0, 3.0];
/// Bound on every `ip`/`tc` call.
const CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a proxy's or the backend's start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    fn env(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP + mTLS (HTTP/2)",
            Transport::Quic => "QUIC (HTTP/3)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum LinkChoice {
    Auto,
    Netem,
    Tun,
}

struct Opts {
    quick: bool,
    warmup: Duration,
    window: Duration,
    transports: Vec<Transport>,
    losses: Vec<f64>,
    link: LinkChoice,
    out: Option<PathBuf>,
    command: String,
}

impl Opts {
    fn parse(quick: bool, args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            quick,
            warmup: Duration::from_secs(if quick { 1 } else { 3 }),
            window: Duration::from_secs(if quick { 3 } else { 20 }),
            transports: vec![Transport::Tcp, Transport::Quic],
            losses: DEFAULT_LOSSES.to_vec(),
            link: LinkChoice::Auto,
            out: None,
            command: std::iter::once("cargo run -p benches --release -- quic")
                .chain(args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (a.as_str(), None),
            };
            if flag == "--quick" {
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("quic: {flag} needs a value"))?,
            };
            match flag {
                "--secs" => {
                    let s: f64 = value
                        .parse()
                        .ok()
                        .filter(|s: &f64| *s > 0.0 && *s <= 3600.0)
                        .ok_or_else(|| format!("quic: --secs {value}: not 0 < seconds ≤ 3600"))?;
                    o.window = Duration::from_secs_f64(s);
                }
                "--transport" => {
                    o.transports = value
                        .split(',')
                        .map(|t| match t.trim() {
                            "tcp" => Ok(Transport::Tcp),
                            "quic" => Ok(Transport::Quic),
                            other => Err(format!("quic: --transport {other}: tcp or quic")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--loss" => {
                    o.losses = value
                        .split(',')
                        .map(|l| {
                            l.trim()
                                .trim_end_matches('%')
                                .parse::<f64>()
                                .ok()
                                .filter(|l| (0.0..=50.0).contains(l))
                                .ok_or_else(|| format!("quic: --loss {l}: a percentage 0–50"))
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--link" => {
                    o.link = match value.as_str() {
                        "auto" => LinkChoice::Auto,
                        "netem" => LinkChoice::Netem,
                        "tun" => LinkChoice::Tun,
                        other => return Err(format!("quic: --link {other}: auto, netem or tun")),
                    }
                }
                "--out" => o.out = Some(PathBuf::from(value)),
                other => {
                    return Err(format!(
                        "quic: unknown flag {other}; flags: --quick --secs N --transport tcp,quic --loss 0,1,3 --link auto|netem|tun --out DIR"
                    ));
                }
            }
        }
        if o.transports.is_empty() || o.losses.is_empty() {
            return Err("quic: nothing to measure".into());
        }
        Ok(o)
    }

    /// Where the report goes: `--out`, else benches/results for a full run of everything,
    /// else a temporary directory.
    fn out_dir(&self) -> PathBuf {
        let full = !self.quick
            && self.transports == [Transport::Tcp, Transport::Quic]
            && self.losses == DEFAULT_LOSSES;
        match (&self.out, full) {
            (Some(d), _) => d.clone(),
            (None, true) => crate::workspace().join("benches/results"),
            (None, false) => std::env::temp_dir().join("remora-bench-quic"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands, namespaces and the link.

/// Runs a command to completion within `timeout` (killed after it); its standard output, or an
/// error with its standard error.
fn run_cmd(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let shown = || format!("`{program} {}`", args.join(" "));
    let mut child = die_with_parent(&mut Command::new(program))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", shown()))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        None => Err(format!("{} did not finish in {timeout:?}; killed", shown())),
        Some(s) if !s.success() => Err(format!("{} failed ({s}): {}", shown(), err.trim())),
        Some(_) => Ok(out),
    }
}

/// Makes the child die with the harness (SIGKILL when the thread that started it exits), so a
/// killed run leaves no proxy behind in a namespace. Children are started from the main thread.
fn die_with_parent(c: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run_cmd("ip", args, CMD_TIMEOUT)
}

fn tc(args: &[&str]) -> Result<String, String> {
    run_cmd("tc", args, CMD_TIMEOUT)
}

/// Runs `f` on a thread that has entered the network namespace `ns` (a network namespace is a
/// per-thread attribute, so the rest of the harness stays where it is). Sockets and TUN
/// devices opened there stay in that namespace.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
                // SAFETY: setns(2) on a valid descriptor; it changes only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| format!("a thread in namespace {ns} panicked"))?
    })
}

/// The two namespaces; deleted on drop (which comes after the processes in them are killed:
/// declared first, dropped last).
struct Netns {
    client: String,
    server: String,
    created: Vec<String>,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        remove_stale();
        let pid = std::process::id();
        let mut n = Netns {
            client: format!("rq-client-{pid}"),
            server: format!("rq-server-{pid}"),
            created: Vec::new(),
        };
        for name in [n.client.clone(), n.server.clone()] {
            ip(&["netns", "add", &name])?;
            n.created.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn both(&self) -> [(&str, &str); 2] {
        [(&self.client, CLIENT_IP), (&self.server, SERVER_IP)]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.created.iter().rev() {
            if let Err(e) = run_cmd("ip", &["netns", "del", name], CMD_TIMEOUT) {
                eprintln!("quic: could not delete namespace {name}: {e}");
            }
        }
    }
}

/// Deletes namespaces an earlier run left behind (killed before its Drop ran): ours by name,
/// whose process is gone.
fn remove_stale() {
    let list = ip(&["netns", "list"]).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let pid = name
            .strip_prefix("rq-client-")
            .or_else(|| name.strip_prefix("rq-server-"));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok())
            && !bench_alive(pid)
        {
            eprintln!("quic: deleting namespace {name} left by an earlier run");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Whether PID is a running (not zombie) process of this bench binary.
fn bench_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let me = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    matches!(state, Some(s) if s != "Z" && s != "X") && comm == me
}

/// The emulated link between the namespaces.
enum Link {
    /// A veth pair with netem on both ends.
    Netem { qdisc: String },
    /// TUN devices and the harness forwarding between them.
    Tun(TunLink),
}

impl Link {
    /// Sets the link up: netem if `choice` allows and the kernel has it, else the TUN
    /// emulator. Also says why, for the report.
    fn create(ns: &Netns, choice: LinkChoice) -> Result<(Link, String), String> {
        let netem = match choice {
            LinkChoice::Tun => Err("--link tun".to_string()),
            LinkChoice::Auto | LinkChoice::Netem => probe_netem(&ns.client),
        };
        match (netem, choice) {
            (Ok(()), _) => {
                ip(&[
                    "link", "add", "name", DEV, "netns", &ns.client, "type", "veth", "peer",
                    "name", DEV, "netns", &ns.server,
                ])?;
                for (name, addr) in ns.both() {
                    ip(&["-n", name, "addr", "add", &format!("{addr}/24"), "dev", DEV])?;
                    ip(&["-n", name, "link", "set", DEV, "up"])?;
                }
                let link = Link::Netem {
                    qdisc: String::new(),
                };
                Ok((link, "tc netem on a veth pair".into()))
            }
            (Err(e), LinkChoice::Netem) => Err(format!(
                "--link netem, but the kernel has no sch_netem: {e} (`modprobe sch_netem`, or --link tun)"
            )),
            (Err(e), _) => {
                let why = match choice {
                    LinkChoice::Tun => "chosen with --link tun".to_string(),
                    _ => format!("this kernel has no sch_netem ({e})"),
                };
                eprintln!("quic: link emulated in user space over TUN devices: {why}");
                Ok((
                    Link::Tun(TunLink::start(ns)?),
                    format!("the harness's user-space emulator over TUN devices, {why}"),
                ))
            }
        }
    }

    fn set_loss(&mut self, ns: &Netns, loss: f64) -> Result<(), String> {
        match self {
            Link::Netem { qdisc } => {
                let delay = format!("{}ms", DELAY.as_millis());
                let loss = format!("{loss}%");
                qdisc.clear();
                for (name, _) in ns.both() {
                    tc(&[
                        "-n", name, "qdisc", "replace", "dev", DEV, "root", "netem", "delay",
                        &delay, "loss", &loss,
                    ])?;
                    let shown = tc(&["-n", name, "qdisc", "show", "dev", DEV])?;
                    if !shown.contains("netem") {
                        return Err(format!("no netem qdisc on {name}/{DEV}: {shown}"));
                    }
                    let _ = write!(qdisc, "{name}: {} ", shown.trim());
                }
                Ok(())
            }
            Link::Tun(t) => {
                t.loss_ppm
                    .store((loss * 10_000.0).round() as u32, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Packets passed and dropped by the emulation so far, both directions.
    fn counters(&self, ns: &Netns) -> (u64, u64) {
        match self {
            Link::Netem { .. } => ns
                .both()
                .iter()
                .map(|(name, _)| {
                    netem_counters(
                        &tc(&["-s", "-n", name, "qdisc", "show", "dev", DEV]).unwrap_or_default(),
                    )
                })
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            Link::Tun(t) => (
                t.passed.load(Ordering::Relaxed),
                t.dropped.load(Ordering::Relaxed),
            ),
        }
    }
}

/// Whether netem can be attached (on the client namespace's loopback, removed again).
fn probe_netem(ns: &str) -> Result<(), String> {
    tc(&[
        "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
    ])?;
    tc(&["-n", ns, "qdisc", "del", "dev", "lo", "root"]).map(|_| ())
}

/// `Sent B bytes P pkt (dropped D, …` of `tc -s qdisc show`: (P, D).
fn netem_counters(text: &str) -> (u64, u64) {
    let Some(line) = text.lines().find(|l| l.trim_start().starts_with("Sent ")) else {
        return (0, 0);
    };
    let w: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| {
        w.get(i)
            .map(|v| v.trim_end_matches(','))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (num(3), num(6))
}

/// The user-space link: a TUN device (`rq0`, IFF_TUN | IFF_NO_PI) in each namespace; per
/// direction one thread reads packets from one device and drops each with the set probability,
/// another writes the rest into the other device when their 5 ms are up (constant delay, so in
/// order). The kernel segments GSO packets before a TUN device without a virtio-net header,
/// so loss is decided per wire-sized packet. Stopped on drop.
struct TunLink {
    stop: Arc<AtomicBool>,
    loss_ppm: Arc<AtomicU32>,
    passed: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl TunLink {
    fn start(ns: &Netns) -> Result<TunLink, String> {
        let client = Arc::new(in_netns(&ns.client, || open_tun(DEV))??);
        let server = Arc::new(in_netns(&ns.server, || open_tun(DEV))??);
        for (name, addr) in ns.both() {
            ip(&["-n", name, "addr", "add", &format!("{addr}/24"), "dev", DEV])?;
            ip(&["-n", name, "link", "set", DEV, "mtu", "1500", "up"])?;
        }
        let mut link = TunLink {
            stop: Arc::new(AtomicBool::new(false)),
            loss_ppm: Arc::new(AtomicU32::new(0)),
            passed: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
        };
        link.direction(client.clone(), server.clone(), 1);
        link.direction(server, client, 2);
        Ok(link)
    }

    fn direction(&mut self, from: Arc<OwnedFd>, to: Arc<OwnedFd>, seed: u64) {
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let (stop, loss, passed, dropped) = (
            self.stop.clone(),
            self.loss_ppm.clone(),
            self.passed.clone(),
            self.dropped.clone(),
        );
        self.threads.push(std::thread::spawn(move || {
            pin_thread(1);
            let mut rng = Rng::new(seed);
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: from.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                // SAFETY: reads into a buffer of the length given.
                let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                if rng.below_ppm(loss.load(Ordering::Relaxed)) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if tx
                    .send((Instant::now() + DELAY, buf[..n as usize].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }));
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            pin_thread(1);
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok((due, packet)) => {
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        // SAFETY: writes a buffer of the length given.
                        let n = unsafe {
                            libc::write(to.as_raw_fd(), packet.as_ptr().cast(), packet.len())
                        };
                        if n > 0 {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {}
                    Err(_) => break,
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Opens a new TUN device of this name in the calling thread's network namespace.
fn open_tun(name: &str) -> Result<OwnedFd, String> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF takes a struct ifreq, which IfReq lays out (name, flags, padding to 40).
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(OwnedFd::from(file))
}

/// Pins the calling thread to one CPU and gives it real-time priority (SCHED_FIFO 10), so the
/// link's delay does not grow when the CPU is busy (best effort: both are root's to set). The
/// forwarding threads block in poll, recv or sleep between packets, and the kernel's RT
/// throttling bounds them anyway.
fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; pid 0 is this thread; sched_param is
    // plain data.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        let param = libc::sched_param { sched_priority: 10 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
    }
}

/// xorshift64*: enough randomness for dropping packets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng((t ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// True with probability ppm / 1,000,000.
    fn below_ppm(&mut self, ppm: u32) -> bool {
        ppm > 0 && (self.next() >> 11) % 1_000_000 < ppm as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Processes in the namespaces.

/// A process started in a namespace with `ip netns exec NS taskset -c CPU PROGRAM …`; both
/// exec, so the child's PID is the program's. Output goes to `log`.
fn spawn_in(
    ns: &str,
    cpu: &str,
    program: &str,
    args: &[&str],
    envs: &[(&str, String)],
    log: &Path,
) -> Result<Guard, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut c = Command::new("ip");
    die_with_parent(&mut c)
        .args(["netns", "exec", ns, "taskset", "-c", cpu, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn()
        .map(Guard)
        .map_err(|e| format!("ip netns exec {ns} {program}: {e}"))
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Waits until `ready` holds, failing early if the process exits; errors carry its log's end.
fn wait_until(
    g: &mut Guard,
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = g.0.try_wait() {
            return Err(format!(
                "{what} exited ({status}) before it was ready; {}:\n{}",
                log.display(),
                log_tail(log)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} not ready after {START_TIMEOUT:?}; {}:\n{}",
                log.display(),
                log_tail(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET a path of the admin server at 127.0.0.1:ADMIN in namespace `ns` (5 s bounds); the
/// response, or empty.
fn admin_get(ns: &str, path: &str) -> String {
    use std::io::Write;
    let get = || {
        let bound = Some(Duration::from_secs(5));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ADMIN));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(bound).ok()?;
        s.set_write_timeout(bound).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    in_netns(ns, get).ok().flatten().unwrap_or_default()
}

fn is_ready(ns: &str) -> bool {
    let r = admin_get(ns, "/ready");
    r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200")
}

struct Proxy {
    guard: Guard,
    pid: u32,
}

fn start_proxy(
    ns: &str,
    bin: &str,
    env: &[(&str, String)],
    what: &str,
    log: &Path,
) -> Result<Proxy, String> {
    let mut guard = spawn_in(ns, "0", bin, &[], env, log)?;
    wait_until(&mut guard, what, log, || is_ready(ns))?;
    let pid = guard.0.id();
    // CPU is read from /proc/PID/stat: make sure PID is the proxy, not a wrapper.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let want = Path::new(bin)
        .file_name()
        .map(|f| f.to_string_lossy().chars().take(15).collect::<String>())
        .unwrap_or_default();
    if comm.trim() != want {
        return Err(format!(
            "{what}: PID {pid} is `{}`, not {want}",
            comm.trim()
        ));
    }
    Ok(Proxy { guard, pid })
}

/// The outbound proxy's hop metrics.
#[derive(Clone, Debug, Default)]
struct Hop {
    /// `remora_mesh_connections_total` is exported at all.
    present: bool,
    quic: f64,
    tcp: f64,
    fallbacks: Option<f64>,
}

fn hop_metrics(text: &str) -> Hop {
    let mut h = Hop::default();
    let value = |l: &str| {
        l.rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap_or("");
        match name {
            "remora_mesh_connections_total" if l.contains("direction=\"outbound\"") => {
                h.present = true;
                if l.contains("transport=\"quic\"") {
                    h.quic += value(l);
                } else if l.contains("transport=\"tcp\"") {
                    h.tcp += value(l);
                }
            }
            "remora_quic_fallbacks_total" => {
                *h.fallbacks.get_or_insert(0.0) += value(l);
            }
            _ => {}
        }
    }
    h
}

/// The transport check: an error unless the hop ran over what was asked for.
fn check_transport(t: Transport, h: &Hop) -> Result<(), String> {
    let seen = format!(
        "remora_mesh_connections_total{{direction=\"outbound\"}}: quic={} tcp={}, remora_quic_fallbacks_total={}",
        h.quic,
        h.tcp,
        h.fallbacks.map_or("absent".into(), |f| f.to_string())
    );
    match (t, h.present) {
        (Transport::Quic, false) => Err(
            "QUIC was asked for (REMORA_MESH_TRANSPORT=quic), but the outbound proxy exports no \
             remora_mesh_connections_total, so the transport cannot be told: is the QUIC hop in \
             this remora-proxy build?"
                .into(),
        ),
        (Transport::Quic, true) if h.quic < 1.0 => Err(format!(
            "QUIC was asked for (REMORA_MESH_TRANSPORT=quic), but no QUIC connection was made: \
             the hop ran over TCP ({seen})"
        )),
        (Transport::Tcp, true) if h.quic > 0.0 => Err(format!(
            "TCP was asked for, but the outbound proxy made QUIC connections ({seen})"
        )),
        (Transport::Tcp, true) if h.tcp < 1.0 => Err(format!(
            "TCP was asked for, but the outbound proxy counted no TCP mesh connection ({seen})"
        )),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// The measurement.

struct Load {
    ok: u64,
    errors: u64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// One run of `benches grpc-closed` in the client namespace (pinned to CPU 1).
fn closed_loop(ns: &str, warmup: Duration, window: Duration) -> Result<Load, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let exe = exe.to_str().ok_or("non-UTF-8 path of the bench binary")?;
    let addr = format!("127.0.0.1:{OUTBOUND}");
    let (streams, warm, win) = (
        STREAMS.to_string(),
        warmup.as_millis().to_string(),
        window.as_millis().to_string(),
    );
    let out = run_cmd(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "taskset",
            "-c",
            "1",
            exe,
            "grpc-closed",
            &addr,
            AUTHORITY,
            &streams,
            &warm,
            &win,
        ],
        // A call gives up after 10 s (load.rs), so this is generous.
        warmup + window + Duration::from_secs(30),
    )?;
    let f: Vec<f64> = out
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() != 6 {
        return Err(format!("grpc-closed printed `{}`", out.trim()));
    }
    Ok(Load {
        ok: f[0] as u64,
        errors: f[1] as u64,
        p50: f[2] / 1000.0,
        p99: f[3] / 1000.0,
        p999: f[4] / 1000.0,
        max: f[5] / 1000.0,
    })
}

struct Row {
    transport: Transport,
    loss: f64,
    load: Load,
    rps: f64,
    client_cpu_us: f64,
    server_cpu_us: f64,
    hop: Hop,
    /// Packets passed and dropped by the link in the counted window.
    link: (u64, u64),
}

impl Row {
    fn markdown(&self) -> String {
        let l = &self.load;
        let measured = match self.link {
            (p, d) if p + d > 0 => format!("{:.2} %", d as f64 * 100.0 / (p + d) as f64),
            _ => "–".into(),
        };
        let hop = match self.hop.present {
            true => format!("{} / {}", self.hop.quic, self.hop.tcp),
            false => "metric absent".into(),
        };
        format!(
            "| {} | {} % | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {hop} | {} | {measured} |",
            self.transport.label(),
            self.loss,
            l.ok,
            l.errors,
            self.rps,
            l.p50,
            l.p99,
            l.p999,
            l.max,
            self.client_cpu_us,
            self.server_cpu_us,
            self.hop.fallbacks.map_or("–".into(), |f| f.to_string()),
        )
    }
}

const HEADER: &str = "| transport | loss each way | calls OK | errors | calls/s | p50 ms | p99 ms | p99.9 ms | max ms | outbound proxy CPU µs/call | inbound proxy CPU µs/call | hop connections QUIC / TCP | QUIC fallbacks | loss measured on the link |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

struct Setup<'a> {
    ns: &'a Netns,
    bin: &'a str,
    tmp: &'a Path,
    client_dir: &'a Path,
    server_dir: &'a Path,
    server_id: &'a str,
}

fn measure(
    s: &Setup<'_>,
    link: &mut Link,
    o: &Opts,
    transport: Transport,
    loss: f64,
) -> Result<Row, String> {
    link.set_loss(s.ns, loss)?;
    let tag = format!("{}-{loss}", transport.env());
    let server_env = vec![
        ("REMORA_INBOUND_ADDR", format!("{SERVER_IP}:{INBOUND}")),
        ("REMORA_OUTBOUND_ADDR", format!("127.0.0.1:{OUTBOUND}")),
        ("REMORA_ADMIN_ADDR", format!("127.0.0.1:{ADMIN}")),
        ("REMORA_APP_ADDR", format!("127.0.0.1:{BACKEND}")),
        ("REMORA_IDENTITY_DIR", s.server_dir.display().to_string()),
        ("REMORA_MTLS", "strict".into()),
        ("REMORA_LOG", "warn".into()),
    ];
    let server = start_proxy(
        &s.ns.server,
        s.bin,
        &server_env,
        "inbound proxy",
        &s.tmp.join(format!("inbound-{tag}.log")),
    )?;
    let client_env = vec![
        ("REMORA_INBOUND_ADDR", format!("127.0.0.1:{INBOUND}")),
        ("REMORA_OUTBOUND_ADDR", format!("127.0.0.1:{OUTBOUND}")),
        ("REMORA_ADMIN_ADDR", format!("127.0.0.1:{ADMIN}")),
        ("REMORA_APP_ADDR", "127.0.0.1:9".into()),
        ("REMORA_IDENTITY_DIR", s.client_dir.display().to_string()),
        (
            "REMORA_DESTINATIONS",
            format!("{AUTHORITY}={SERVER_IP}:{INBOUND}#{}", s.server_id),
        ),
        ("REMORA_MESH_TRANSPORT", transport.env().into()),
        ("REMORA_LOG", "warn".into()),
    ];
    let client_log = s.tmp.join(format!("outbound-{tag}.log"));
    let client = start_proxy(
        &s.ns.client,
        s.bin,
        &client_env,
        "outbound proxy",
        &client_log,
    )?;

    // Warm-up: the hop's connection and handshake, and both proxies' pools, outside the count.
    let warm = closed_loop(&s.ns.client, Duration::ZERO, o.warmup)?;
    if warm.ok == 0 {
        return Err(format!(
            "{tag}: no call answered in the warm-up ({} errors); {}:\n{}",
            warm.errors,
            client_log.display(),
            log_tail(&client_log)
        ));
    }
    let link_before = link.counters(s.ns);
    let (c0, s0) = (cpu_seconds(client.pid), cpu_seconds(server.pid));
    let load = closed_loop(&s.ns.client, Duration::ZERO, o.window)?;
    let (c1, s1) = (cpu_seconds(client.pid), cpu_seconds(server.pid));
    let link_after = link.counters(s.ns);
    let hop = hop_metrics(&admin_get(&s.ns.client, "/metrics"));
    check_transport(transport, &hop).map_err(|e| {
        format!(
            "{} at {loss} % loss: {e}; outbound proxy log {}:\n{}",
            transport.env(),
            client_log.display(),
            log_tail(&client_log)
        )
    })?;
    let per_call = |cpu: f64| cpu * 1e6 / load.ok.max(1) as f64;
    let row = Row {
        transport,
        loss,
        rps: load.ok as f64 / o.window.as_secs_f64(),
        client_cpu_us: per_call(c1 - c0),
        server_cpu_us: per_call(s1 - s0),
        hop,
        link: (
            link_after.0.saturating_sub(link_before.0),
            link_after.1.saturating_sub(link_before.1),
        ),
        load,
    };
    drop(client.guard);
    drop(server.guard);
    Ok(row)
}

pub fn run(quick: bool, args: &[String]) -> Result<(), String> {
    let o = Opts::parse(quick, args)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("quic: needs root (it creates network namespaces)".into());
    }
    for tool in ["ip", "tc", "taskset"] {
        if run_cmd("sh", &["-c", &format!("command -v {tool}")], CMD_TIMEOUT).is_err() {
            return Err(format!(
                "quic: `{tool}` not found (apt-get install -y iproute2 util-linux)"
            ));
        }
    }
    let bin = build_proxy()?;
    let bin_s = bin.to_str().unwrap_or("remora-proxy").to_string();

    let tmp = std::env::temp_dir().join(format!("remora-bench-quic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = run_in(&o, &bin, &bin_s, &tmp);
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(_) => eprintln!("quic: logs kept in {}", tmp.display()),
    }
    result
}

fn run_in(o: &Opts, bin: &Path, bin_s: &str, tmp: &Path) -> Result<(), String> {
    // Identities: one CA, a leaf each for the client and server proxy.
    let ca = tmp.join("ca");
    remora_certs::ca::init_dir(&ca, "cluster.local").map_err(|e| e.to_string())?;
    let issuer = remora_certs::ca::LoadedIssuer::from_dir(&ca).map_err(|e| e.to_string())?;
    let ident = |sa: &str| -> Result<(String, PathBuf), String> {
        let id = remora_certs::SpiffeId::workload("cluster.local", "default", sa)
            .map_err(|e| e.to_string())?;
        let leaf = remora_certs::ca::issue_with_new_key(&issuer, &id, Duration::from_secs(3600))
            .map_err(|e| e.to_string())?;
        leaf.write(&tmp.join(sa)).map_err(|e| e.to_string())?;
        Ok((id.to_string(), tmp.join(sa)))
    };
    let (server_id, server_dir) = ident("server")?;
    let (_, client_dir) = ident("client")?;

    // Declared before every process, so dropped (namespaces deleted) after all of them.
    let ns = Netns::create()?;
    let (mut link, link_note) = Link::create(&ns, o.link)?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let exe = exe.to_str().ok_or("non-UTF-8 path of the bench binary")?;
    let backend_log = tmp.join("backend.log");
    let mut backend = spawn_in(
        &ns.server,
        "1",
        exe,
        &["backend", &BACKEND.to_string()],
        &[],
        &backend_log,
    )?;
    wait_until(&mut backend, "gRPC backend", &backend_log, || {
        in_netns(&ns.server, || {
            std::net::TcpStream::connect(("127.0.0.1", BACKEND)).is_ok()
        })
        .unwrap_or(false)
    })?;
    // The link works, and has the delay it should, before anything is measured: 20 TCP
    // connection attempts from the client namespace to a closed port of the server's address
    // (SYN out, RST back: one round trip each; a timeout means no link).
    link.set_loss(&ns, 0.0)?;
    let rtts = in_netns(&ns.client, || {
        let addr = std::net::SocketAddr::from(([10, 77, 0, 2], BACKEND));
        (0..20)
            .map(|_| {
                let start = Instant::now();
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Ok(start.elapsed().as_secs_f64() * 1000.0)
                    }
                    Ok(_) => Err(format!("{addr} accepted a connection; it should refuse")),
                    Err(e) => Err(format!("{SERVER_IP} unreachable from {}: {e}", ns.client)),
                }
            })
            .collect::<Result<Vec<f64>, String>>()
    })??;
    let rtt = crate::median(rtts.clone());
    let rtt_max = rtts.iter().copied().fold(0.0, f64::max);
    // Below 2 × the delay: the delay is not applied; far above: the emulation cannot keep up.
    if !(1.8..5.0).contains(&(rtt / DELAY.as_secs_f64() / 1000.0)) {
        return Err(format!(
            "the link's round trip is {rtt:.2} ms (median of 20), not about 2 × {} ms",
            DELAY.as_millis()
        ));
    }
    let link_note = format!(
        "{link_note}; round trip measured before the rows (TCP SYN → RST, 20 times): median {rtt:.2} ms, max {rtt_max:.2} ms"
    );

    let setup = Setup {
        ns: &ns,
        bin: bin_s,
        tmp,
        client_dir: &client_dir,
        server_dir: &server_dir,
        server_id: &server_id,
    };
    println!(
        "## The meshed hop: QUIC against TCP + mTLS, {STREAMS} streams, {} ms each way ({})\n",
        DELAY.as_millis(),
        link_note
    );
    println!("{HEADER}");
    let mut rows = Vec::new();
    for &loss in &o.losses {
        for &t in &o.transports {
            let row = measure(&setup, &mut link, o, t, loss)?;
            println!("{}", row.markdown());
            rows.push(row);
        }
    }
    let qdisc = match &link {
        Link::Netem { qdisc } => qdisc.clone(),
        Link::Tun(_) => String::new(),
    };
    drop(backend);
    drop(link);
    drop(ns);

    let out = o.out_dir();
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let report = render(o, &rows, &link_note, &qdisc, bin);
    let md = out.join("quic.md");
    std::fs::write(&md, &report).map_err(|e| format!("{}: {e}", md.display()))?;
    let svg = out.join("quic-latency.svg");
    plot(&svg, &rows, o)?;
    println!("\nwrote {} and {}", md.display(), svg.display());
    Ok(())
}

fn plot(path: &Path, rows: &[Row], o: &Opts) -> Result<(), String> {
    type Pick = fn(&Load) -> f64;
    let percentiles: [(&str, Pick); 3] = [
        ("p50", |l| l.p50),
        ("p99", |l| l.p99),
        ("p99.9", |l| l.p999),
    ];
    let panels: Vec<crate::plot::Panel> = percentiles
        .iter()
        .map(|(name, pick)| {
            let series = o
                .transports
                .iter()
                .map(|t| {
                    let points = rows
                        .iter()
                        .filter(|r| r.transport == *t)
                        .map(|r| (r.loss, pick(&r.load)))
                        .collect();
                    (t.label().to_string(), points)
                })
                .collect();
            (name.to_string(), series)
        })
        .collect();
    crate::plot::panels(
        path,
        &format!(
            "gRPC unary latency over the meshed hop: {STREAMS} streams, {} ms each way",
            DELAY.as_millis()
        ),
        "packet loss each way, %",
        "ms",
        &panels,
    )
}

fn render(o: &Opts, rows: &[Row], link_note: &str, qdisc: &str, bin: &Path) -> String {
    let sh = |c: &str| {
        run_cmd("sh", &["-c", c], CMD_TIMEOUT)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| e)
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# The meshed hop over QUIC against TCP + mTLS, on a lossy link\n\n\
         Made by `{}` on {} ({}).\n\n\
         {STREAMS} concurrent gRPC unary calls (closed loop, 64-byte messages echoed) on one HTTP/2 \
         connection into the outbound proxy, which carries them over one meshed hop to the inbound \
         proxy and its backend: HTTP/2 over TCP + mTLS, or HTTP/3 over QUIC. The link between the two \
         network namespaces delays each direction by {} ms (10 ms round trip) and drops the given \
         share of packets in each direction. {} s counted per row after {} s of warm-up.\n",
        o.command,
        sh("date -u +%F"),
        if o.quick {
            "`--quick`: a smoke run, not figures"
        } else {
            "full run"
        },
        DELAY.as_millis(),
        o.window.as_secs_f64(),
        o.warmup.as_secs_f64(),
    );
    let _ = writeln!(out, "{HEADER}");
    for r in rows {
        let _ = writeln!(out, "{}", r.markdown());
    }
    let _ = writeln!(
        out,
        "\n![p50, p99 and p99.9 against loss](quic-latency.svg)\n\n\
         ## Method\n\n\
         - Two network namespaces made for the run: the load generator (`benches grpc-closed`, \
         CPU 1) and the outbound proxy (CPU 0) in one; the inbound proxy (CPU 0) and the gRPC echo \
         backend (`benches backend`, CPU 1) in the other. Each proxy runs one worker thread.\n\
         - Link: {link_note}. {}\n\
         - Both proxies have identities from one CA; the inbound proxy refuses plaintext \
         (`REMORA_MTLS=strict`); the outbound proxy has the static destination \
         `{AUTHORITY}={SERVER_IP}:{INBOUND}#<inbound SPIFFE ID>` and `REMORA_MESH_TRANSPORT=tcp` or \
         `quic` (QUIC to UDP port {INBOUND}). Fresh proxies for every row.\n\
         - Per row: a warm-up run of the same load (the hop's handshake happens there), then the \
         counted run. Latency is per call, from sending the request to its trailers, for the calls \
         started in the counted window; calls/s is OK calls over the window. A call that takes \
         over 10 s counts as an error.\n\
         - CPU: utime + stime of each proxy process (/proc/PID/stat, 10 ms ticks) over the counted \
         run, divided by the OK calls.\n\
         - Transport check: after each row the outbound proxy's \
         `remora_mesh_connections_total{{direction=\"outbound\",transport=…}}` must count at least \
         one QUIC connection in a QUIC row, and TCP connections but no QUIC one in a TCP row; the \
         run fails otherwise. The table shows those counters and `remora_quic_fallbacks_total` \
         (a QUIC row with TCP connections or fallbacks ran partly over TCP). \"Loss measured on the link\" is the share of packets the \
         emulation dropped in the counted window, both directions.\n",
        match qdisc.is_empty() {
            true => "Loss is decided per packet: the kernel segments GSO packets before a TUN \
                     device, so every wire-sized packet is dropped on its own. The forwarding \
                     threads run at SCHED_FIFO priority on CPU 1, with the load and the backend; \
                     their wake-ups add jitter to the 5 ms (see the measured round trip above)."
                .to_string(),
            false => format!(
                "netem decides loss per sk_buff, before GSO segmentation: a TCP TSO/GSO packet or \
                 a QUIC UDP-GSO batch is dropped whole. Last qdiscs: `{}`.",
                qdisc.trim()
            ),
        },
    );
    let _ = writeln!(
        out,
        "## Machine\n\n\
         - `nproc`: {}; kernel `{}`; CPU: {}\n\
         - {}\n\
         - remora-proxy: {}\n\
         - {}",
        sh("nproc"),
        sh("uname -r"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        sh("ip -V"),
        crate::describe_bin(bin),
        provenance(),
    );
    out
}

/// Which source the proxy was built from (others may be editing the tree).
fn provenance() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate::workspace())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).trim().to_string();
    let dirty: Vec<String> = git(&["status", "--porcelain", "--", "proxy", "certs", "api"])
        .lines()
        .filter_map(|l| l.get(3..).map(str::to_string))
        .collect();
    match dirty.is_empty() {
        true => format!("built from commit {head}"),
        false => format!(
            "built from commit {head} plus uncommitted changes in {}",
            dirty.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_metrics_read_transport_and_fallbacks() {
        let text = "# TYPE remora_mesh_connections_total counter\n\
            remora_mesh_connections_total{direction=\"outbound\",transport=\"quic\"} 1\n\
            remora_mesh_connections_total{transport=\"tcp\",direction=\"outbound\"} 2\n\
            remora_mesh_connections_total{direction=\"inbound\",transport=\"quic\"} 7\n\
            remora_quic_fallbacks_total 3\n";
        let h = hop_metrics(text);
        assert!(h.present);
        assert_eq!((h.quic, h.tcp, h.fallbacks), (1.0, 2.0, Some(3.0)));
        assert!(check_transport(Transport::Quic, &h).is_ok());
        assert!(check_transport(Transport::Tcp, &h).is_err());
    }

    #[test]
    fn quic_without_quic_connections_fails() {
        let absent = hop_metrics("remora_requests_total{direction=\"outbound\"} 5\n");
        assert!(!absent.present);
        assert!(check_transport(Transport::Quic, &absent).is_err());
        assert!(check_transport(Transport::Tcp, &absent).is_ok());
        let tcp_only = hop_metrics(
            "remora_mesh_connections_total{direction=\"outbound\",transport=\"quic\"} 0\n\
             remora_mesh_connections_total{direction=\"outbound\",transport=\"tcp\"} 1\n",
        );
        let e = check_transport(Transport::Quic, &tcp_only).unwrap_err();
        assert!(e.contains("ran over TCP"), "{e}");
        assert!(check_transport(Transport::Tcp, &tcp_only).is_ok());
    }

    #[test]
    fn netem_counters_parse_tc_s() {
        let text = "qdisc netem 8001: root refcnt 2 limit 1000 delay 5ms loss 1%\n \
                    Sent 123456 bytes 1500 pkt (dropped 15, overlimits 0 requeues 0)\n \
                    backlog 0b 0p requeues 0\n";
        assert_eq!(netem_counters(text), (1500, 15));
        assert_eq!(netem_counters(""), (0, 0));
    }

    #[test]
    fn options() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = Opts::parse(true, &args("--quick --transport tcp --loss 0,3% --secs 2")).unwrap();
        assert_eq!(o.transports, [Transport::Tcp]);
        assert_eq!(o.losses, [0.0, 3.0]);
        assert_eq!(o.window, Duration::from_secs(2));
        assert!(o.out_dir().starts_with(std::env::temp_dir()));
        let full = Opts::parse(false, &[]).unwrap();
        assert!(full.out_dir().ends_with("benches/results"));
        assert!(Opts::parse(false, &args("--transport udp")).is_err());
        assert!(Opts::parse(false, &args("--bogus 1")).is_err());
    }

    #[test]
    fn rng_drops_about_the_share_asked() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let dropped = (0..n).filter(|_| r.below_ppm(30_000)).count();
        let share = dropped as f64 / n as f64;
        assert!((0.025..0.035).contains(&share), "{share}");
        assert!(!(0..1000).any(|_| r.below_ppm(0)));
    }
}
