//! `remora-proxy init`: programs the pod's network namespace so the app's TCP goes through the
//! proxy without the app knowing (the init container of an injected pod; needs NET_ADMIN).
//!
//! The rules live in two chains of the `nat` table, for IPv4 (iptables) and IPv6 (ip6tables),
//! so they can be replaced and removed as a unit without touching anyone else's rules:
//! - `REMORA_INBOUND`, jumped to from `PREROUTING`: TCP arriving for the pod goes to the inbound
//!   port, except skipped ports (the admin port always, so probes and Prometheus reach it).
//! - `REMORA_OUTBOUND`, jumped to from `OUTPUT`: TCP the pod sends goes to the outbound port,
//!   except the proxy's own (by UID: otherwise its upstream connections would loop back into
//!   it), loopback, and skipped ports and CIDRs.
//!
//! Applying is `iptables-restore --noflush` of the chains (declaring a chain flushes it, so a
//! second run replaces the rules rather than adding to them) plus the jumps, each added only
//! when `iptables -C` says it is missing: running it twice leaves one set. `--dry-run` prints
//! exactly the restore input; `--remove` deletes the jumps and the chains.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, ExitCode, Stdio};

pub(crate) const INBOUND_CHAIN: &str = "REMORA_INBOUND";
pub(crate) const OUTBOUND_CHAIN: &str = "REMORA_OUTBOUND";
/// Like Linkerd's: a UID no image uses for anything else.
pub(crate) const DEFAULT_PROXY_UID: u32 = 2102;

#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// Where inbound TCP is redirected (the proxy's inbound listener).
    #[arg(long, default_value_t = 4143)]
    pub inbound_port: u16,
    /// Where the app's outbound TCP is redirected (the proxy's outbound listener).
    #[arg(long, default_value_t = 4140)]
    pub outbound_port: u16,
    /// The proxy's admin port: never redirected (kubelet probes, Prometheus).
    #[arg(long, default_value_t = 4191)]
    pub admin_port: u16,
    /// The UID the proxy runs as; its own connections are not redirected.
    #[arg(long, env = "REMORA_PROXY_UID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Inbound ports reaching the app directly (comma list of ports or ranges a-b).
    #[arg(long, default_value = "")]
    pub skip_inbound_ports: String,
    /// Outbound ports not redirected (comma list of ports or ranges a-b).
    #[arg(long, default_value = "")]
    pub skip_outbound_ports: String,
    /// Destinations not redirected (comma list of CIDRs or addresses, IPv4 or IPv6).
    #[arg(long, default_value = "")]
    pub skip_outbound_cidrs: String,
    /// IPv6 rules too: `auto` when the namespace has IPv6 and ip6tables exists.
    #[arg(long, value_enum, default_value = "auto")]
    pub ipv6: Ipv6,
    /// Print the rules (iptables-restore input) instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove what `init` made (idempotent: nothing to remove is not an error).
    #[arg(long)]
    pub remove: bool,
    /// Also write the PEM trust bundle in REMORA_TRUST_BUNDLE to this file (the injected
    /// pod's identity directory), so the proxy can verify the control plane.
    #[arg(long)]
    pub trust_bundle_out: Option<std::path::PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6 {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn tables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// A port or an inclusive range, as iptables' `--dport` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ports(u16, u16);

impl Ports {
    fn arg(self) -> String {
        if self.0 == self.1 {
            self.0.to_string()
        } else {
            format!("{}:{}", self.0, self.1)
        }
    }
}

pub(crate) fn parse_ports(flag: &str, s: &str) -> Result<Vec<Ports>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{flag} `{part}`: expected a port (1-65535) or a range a-b");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: u16 = a.parse().map_err(|_| bad())?;
        let b: u16 = b.parse().map_err(|_| bad())?;
        if a == 0 || b < a {
            return Err(bad());
        }
        out.push(Ports(a, b));
    }
    Ok(out)
}

/// A destination prefix, normalised (`10.0.0.7` → `10.0.0.7/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr(IpAddr, u8);

pub(crate) fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |why: &str| format!("--skip-outbound-cidrs `{part}`: {why}");
        let (ip, len) = match part.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (part, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| bad("not an IP address (write e.g. 10.0.0.0/8 or fd00::/8)"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| bad(&format!("prefix length must be 0 to {max}")))?,
        };
        out.push(Cidr(ip, len));
    }
    Ok(out)
}

/// What the rules are made of, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub proxy_uid: u32,
    pub skip_inbound: Vec<Ports>,
    pub skip_outbound: Vec<Ports>,
    pub skip_cidrs: Vec<Cidr>,
}

impl Plan {
    pub(crate) fn from_args(a: &InitArgs) -> Result<Plan, String> {
        if a.proxy_uid == 0 {
            return Err("--proxy-uid 0 would exempt root's traffic (every process running as root would bypass the proxy); run the proxy as its own UID (default 2102)".into());
        }
        let distinct = [a.inbound_port, a.outbound_port, a.admin_port];
        if distinct.contains(&0)
            || distinct[0] == distinct[1]
            || distinct[0] == distinct[2]
            || distinct[1] == distinct[2]
        {
            return Err(format!(
                "--inbound-port {}, --outbound-port {} and --admin-port {} must be three different ports from 1 to 65535",
                a.inbound_port, a.outbound_port, a.admin_port
            ));
        }
        Ok(Plan {
            inbound_port: a.inbound_port,
            outbound_port: a.outbound_port,
            admin_port: a.admin_port,
            proxy_uid: a.proxy_uid,
            skip_inbound: parse_ports("--skip-inbound-ports", &a.skip_inbound_ports)?,
            skip_outbound: parse_ports("--skip-outbound-ports", &a.skip_outbound_ports)?,
            skip_cidrs: parse_cidrs(&a.skip_outbound_cidrs)?,
        })
    }

    /// The chains' rules for one family, as `iptables-restore --noflush` input. The jumps
    /// are not in it (see [`jumps`]): restore would append them again on every run.
    pub(crate) fn restore_input(&self, family: Family) -> String {
        let mut out = String::from("*nat\n");
        out += &format!(":{INBOUND_CHAIN} - [0:0]\n:{OUTBOUND_CHAIN} - [0:0]\n");
        let skip = |chain: &str, p: &Ports| {
            format!("-A {chain} -p tcp -m tcp --dport {} -j RETURN\n", p.arg())
        };
        // The admin port first: probes and scrapes must never depend on the redirect.
        out += &skip(INBOUND_CHAIN, &Ports(self.admin_port, self.admin_port));
        for p in &self.skip_inbound {
            out += &skip(INBOUND_CHAIN, p);
        }
        out += &format!(
            "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}\n",
            self.inbound_port
        );
        out += &format!(
            "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN\n",
            self.proxy_uid
        );
        out += &format!("-A {OUTBOUND_CHAIN} -o lo -j RETURN\n");
        for p in &self.skip_outbound {
            out += &skip(OUTBOUND_CHAIN, p);
        }
        for Cidr(ip, len) in &self.skip_cidrs {
            if ip.is_ipv4() == (family == Family::V4) {
                out += &format!("-A {OUTBOUND_CHAIN} -d {ip}/{len} -j RETURN\n");
            }
        }
        out += &format!(
            "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_port
        );
        out += "COMMIT\n";
        out
    }
}

/// The two jumps into the chains: (built-in chain, rule after the chain name).
pub(crate) fn jumps() -> [(&'static str, [&'static str; 4]); 2] {
    [
        ("PREROUTING", ["-p", "tcp", "-j", INBOUND_CHAIN]),
        ("OUTPUT", ["-p", "tcp", "-j", OUTBOUND_CHAIN]),
    ]
}

fn families(ipv6: Ipv6) -> Vec<Family> {
    let v6 = match ipv6 {
        Ipv6::Off => false,
        Ipv6::On => true,
        // A namespace without IPv6 has no /proc/net/if_inet6 (or an empty one).
        Ipv6::Auto => {
            std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
                && which("ip6tables")
        }
    };
    let mut f = vec![Family::V4];
    if v6 {
        f.push(Family::V6);
    }
    f
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(bin).is_file()))
}

/// Runs `iptables -t nat ARGS`, returning whether it succeeded (stderr kept for errors).
fn tables(family: Family, args: &[&str]) -> Result<bool, String> {
    let out = Command::new(family.tables())
        .arg("-w")
        .args(["-t", "nat"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| not_found(family.tables(), e))?;
    Ok(out.status.success())
}

fn not_found(bin: &str, e: std::io::Error) -> String {
    format!(
        "cannot run {bin}: {e}; install iptables (Debian: apt-get install iptables) in the init image, or run with --dry-run to see the rules"
    )
}

fn apply(plan: &Plan, family: Family) -> Result<(), String> {
    let input = plan.restore_input(family);
    let mut child = Command::new(family.restore())
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| not_found(family.restore(), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{}: writing the rules failed: {e}", family.restore()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", family.restore()))?;
    if !out.status.success() {
        return Err(format!(
            "{} refused the rules: {}; the container needs the NET_ADMIN capability (and NET_RAW), and the kernel the nat table",
            family.restore(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    for (builtin, rule) in jumps() {
        let mut check = vec!["-C", builtin];
        check.extend(rule);
        if !tables(family, &check)? {
            let mut add = vec!["-A", builtin];
            add.extend(rule);
            if !tables(family, &add)? {
                return Err(format!(
                    "{} -t nat -A {builtin} {} failed",
                    family.tables(),
                    rule.join(" ")
                ));
            }
        }
    }
    Ok(())
}

fn remove(family: Family) -> Result<(), String> {
    for (builtin, rule) in jumps() {
        let mut del = vec!["-D", builtin];
        del.extend(rule);
        // Bounded: a jump added by hand several times is removed as many times, up to 64.
        for _ in 0..64 {
            if !tables(family, &del)? {
                break;
            }
        }
    }
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        if tables(family, &["-n", "-L", chain])? {
            tables(family, &["-F", chain])?;
            if !tables(family, &["-X", chain])? {
                return Err(format!(
                    "{} -t nat -X {chain} failed: another rule still jumps to it",
                    family.tables()
                ));
            }
        }
    }
    Ok(())
}

fn write_trust_bundle(path: &std::path::Path) -> Result<(), String> {
    let pem = std::env::var("REMORA_TRUST_BUNDLE").map_err(|_| {
        format!(
            "--trust-bundle-out {} needs the PEM trust bundle in REMORA_TRUST_BUNDLE (remora inject sets it from --trust-bundle)",
            path.display()
        )
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("REMORA_TRUST_BUNDLE holds no PEM certificate (-----BEGIN CERTIFICATE-----); pass the ca.crt of `remora ca init`".into());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write the trust bundle to {}: {e}", path.display()))
}

pub fn run(args: &InitArgs) -> ExitCode {
    let plan = match Plan::from_args(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("remora-proxy init: {e}");
            return ExitCode::from(2);
        }
    };
    let families = families(args.ipv6);
    if args.dry_run {
        for f in &families {
            println!("# {} --noflush", f.restore());
            if args.remove {
                for (builtin, rule) in jumps() {
                    println!("# {} -t nat -D {builtin} {}", f.tables(), rule.join(" "));
                }
                println!(
                    "# {} -t nat -F/-X {INBOUND_CHAIN} {OUTBOUND_CHAIN}",
                    f.tables()
                );
                continue;
            }
            print!("{}", plan.restore_input(*f));
            for (builtin, rule) in jumps() {
                println!(
                    "# then, unless present: {} -t nat -A {builtin} {}",
                    f.tables(),
                    rule.join(" ")
                );
            }
        }
        return ExitCode::SUCCESS;
    }
    for f in &families {
        let done = if args.remove {
            remove(*f)
        } else {
            apply(&plan, *f)
        };
        if let Err(e) = done {
            eprintln!("remora-proxy init: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !args.remove
        && let Some(path) = &args.trust_bundle_out
        && let Err(e) = write_trust_bundle(path)
    {
        eprintln!("remora-proxy init: {e}");
        return ExitCode::FAILURE;
    }
    let what = if args.remove { "removed" } else { "installed" };
    eprintln!(
        "remora-proxy init: interception rules {what} ({})",
        families
            .iter()
            .map(|f| f.tables())
            .collect::<Vec<_>>()
            .join(", ")
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> InitArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct A {
            #[command(flatten)]
            init: InitArgs,
        }
        let mut v = vec!["init"];
        v.extend(extra);
        A::try_parse_from(v).unwrap().init
    }

    #[test]
    fn default_rules() {
        let plan = Plan::from_args(&args(&[])).unwrap();
        assert_eq!(
            plan.restore_input(Family::V4),
            "*nat\n:REMORA_INBOUND - [0:0]\n:REMORA_OUTBOUND - [0:0]\n\
             -A REMORA_INBOUND -p tcp -m tcp --dport 4191 -j RETURN\n\
             -A REMORA_INBOUND -p tcp -j REDIRECT --to-ports 4143\n\
             -A REMORA_OUTBOUND -m owner --uid-owner 2102 -j RETURN\n\
             -A REMORA_OUTBOUND -o lo -j RETURN\n\
             -A REMORA_OUTBOUND -p tcp -j REDIRECT --to-ports 4140\n\
             COMMIT\n"
        );
    }

    #[test]
    fn skips_and_families() {
        let plan = Plan::from_args(&args(&[
            "--skip-inbound-ports",
            "9090, 10000-10010",
            "--skip-outbound-ports",
            "5432",
            "--skip-outbound-cidrs",
            "10.0.0.0/8,fd00::/8,192.168.1.7",
            "--proxy-uid",
            "1337",
        ]))
        .unwrap();
        let v4 = plan.restore_input(Family::V4);
        for line in [
            "-A REMORA_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
            "-A REMORA_INBOUND -p tcp -m tcp --dport 10000:10010 -j RETURN",
            "-A REMORA_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
            "-A REMORA_OUTBOUND -d 10.0.0.0/8 -j RETURN",
            "-A REMORA_OUTBOUND -d 192.168.1.7/32 -j RETURN",
            "--uid-owner 1337",
        ] {
            assert!(v4.contains(line), "{line} missing from\n{v4}");
        }
        assert!(!v4.contains("fd00::"), "{v4}");
        let v6 = plan.restore_input(Family::V6);
        assert!(
            v6.contains("-A REMORA_OUTBOUND -d fd00::/8 -j RETURN"),
            "{v6}"
        );
        assert!(!v6.contains("10.0.0.0"), "{v6}");
        // Skips come before the redirect, or they would never match.
        let redirect = v4.find("--to-ports 4140").unwrap();
        assert!(v4.find("10.0.0.0/8").unwrap() < redirect);
    }

    #[test]
    fn bad_input_is_refused_with_the_flag() {
        for (flags, expect) in [
            (
                vec!["--skip-inbound-ports", "80,abc"],
                "--skip-inbound-ports `abc`",
            ),
            (
                vec!["--skip-outbound-ports", "90-80"],
                "--skip-outbound-ports `90-80`",
            ),
            (
                vec!["--skip-outbound-ports", "0"],
                "--skip-outbound-ports `0`",
            ),
            (
                vec!["--skip-outbound-cidrs", "10.0.0.0/33"],
                "prefix length",
            ),
            (vec!["--skip-outbound-cidrs", "example.com"], "not an IP"),
            (vec!["--proxy-uid", "0"], "--proxy-uid 0"),
            (vec!["--outbound-port", "4143"], "three different ports"),
        ] {
            let err = Plan::from_args(&args(&flags)).unwrap_err();
            assert!(err.contains(expect), "{flags:?}: {err}");
        }
    }
}
