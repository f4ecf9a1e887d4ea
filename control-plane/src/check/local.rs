//! The network namespace `remora check --local` runs in (a pod's, through `kubectl debug` or
//! `nsenter`): which addresses the application listens on, and whether the interception
//! rules `remora-proxy init` writes are there and still match the running proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Finding;

const INBOUND_CHAIN: &str = "REMORA_INBOUND";
const OUTBOUND_CHAIN: &str = "REMORA_OUTBOUND";
/// The proxy's own ports in an injected pod (inbound, outbound, admin).
const PROXY_PORTS: [u16; 3] = [4143, 4140, 4191];

/// A listening TCP socket, from `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
    pub uid: u32,
}

/// The listening sockets in a `/proc/net/tcp` or `/proc/net/tcp6` text; lines that do not
/// parse are skipped (the format is the kernel's, and a new column must not break this).
pub fn listeners(proc_net_tcp: &str) -> Vec<Listener> {
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid ...
            if f.len() < 8 || f[3] != "0A" {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let addr = match addr.len() {
                8 => IpAddr::V4(Ipv4Addr::from(
                    u32::from_str_radix(addr, 16).ok()?.swap_bytes(),
                )),
                32 => {
                    let mut bytes = [0u8; 16];
                    for i in 0..4 {
                        let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
                    }
                    IpAddr::V6(Ipv6Addr::from(bytes))
                }
                _ => return None,
            };
            let uid = f[7].parse().ok()?;
            Some(Listener { addr, port, uid })
        })
        .collect()
}

/// Where the application listens. `ports`: the application's ports to check (each must have
/// a listener); empty: every listening port but the proxy's.
pub fn sockets(all: &[Listener], ports: &[u16], proxy_uid: Option<u32>) -> Vec<Finding> {
    let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
    for l in all {
        let proxy_owned = proxy_uid == Some(l.uid) || PROXY_PORTS.contains(&l.port);
        if ports.is_empty() && proxy_owned {
            continue;
        }
        if ports.is_empty() || ports.contains(&l.port) {
            by_port.entry(l.port).or_default().push(l.addr);
        }
    }
    let mut out = Vec::new();
    for p in ports {
        if !by_port.contains_key(p) {
            out.push(Finding::error(
                format!("port {p}"),
                "nothing listens on it in this network namespace",
                "start the application, or check the port it was configured with",
            ));
        }
    }
    for (port, addrs) in by_port {
        let subject = format!("port {port}");
        let list = addrs
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if addrs.iter().any(IpAddr::is_unspecified) {
            out.push(Finding::ok(
                subject,
                format!("listens on all addresses ({list})"),
            ));
        } else if addrs.iter().all(IpAddr::is_loopback) {
            out.push(Finding::warning(
                subject,
                format!("listens only on loopback ({list}): reachable through the proxy, but not from other pods without it (a port in remora.io/skip-inbound-ports, or the pod without its sidecar)"),
                "listen on 0.0.0.0 unless the port must stay private to the pod",
            ));
        } else if !addrs.iter().any(IpAddr::is_loopback) {
            out.push(Finding::error(
                subject,
                format!("listens only on {list}: the proxy delivers inbound traffic to 127.0.0.1:{port}, so none reaches it"),
                format!("listen on 0.0.0.0:{port} (or also on 127.0.0.1:{port})"),
            ));
        } else {
            out.push(Finding::ok(subject, format!("listens on {list}")));
        }
    }
    out
}

/// The interception rules in one family's `iptables-save -t nat` output, against the
/// listening sockets: present, jumped to, redirecting to a port the proxy listens on, and
/// exempting the user the proxy runs as.
pub fn rules(family: &str, save: &str, all: &[Listener]) -> Vec<Finding> {
    let subject = format!("{family} interception rules");
    let has_chain = |c: &str| save.lines().any(|l| l.starts_with(&format!(":{c} ")));
    if !has_chain(INBOUND_CHAIN) && !has_chain(OUTBOUND_CHAIN) {
        return vec![Finding::error(
            subject,
            "missing: no REMORA_INBOUND/REMORA_OUTBOUND chains in the nat table, so traffic bypasses the proxy",
            "run `remora-proxy init` in the pod's network namespace (the injected remora-init container does: check that it ran and has NET_ADMIN)",
        )];
    }
    let mut out = Vec::new();
    for (builtin, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
        let jumps = save
            .lines()
            .filter(|l| {
                l.starts_with(&format!("-A {builtin} ")) && l.ends_with(&format!("-j {chain}"))
            })
            .count();
        if !has_chain(chain) || jumps == 0 {
            out.push(Finding::error(
                &subject,
                format!("stale: {chain} is not jumped to from {builtin} (half-removed rules?)"),
                "rerun `remora-proxy init` (it adds what is missing), or `remora-proxy init --remove` and then init",
            ));
        } else if jumps > 1 {
            out.push(Finding::warning(
                &subject,
                format!("{builtin} jumps to {chain} {jumps} times"),
                "run `remora-proxy init --remove` until it reports nothing left, then `remora-proxy init` once",
            ));
        }
        let redirect = save
            .lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .find_map(|l| l.split_once("--to-ports ").map(|(_, p)| p.trim()))
            .and_then(|p| p.parse::<u16>().ok());
        match redirect {
            None if has_chain(chain) => out.push(Finding::error(
                &subject,
                format!("stale: {chain} redirects nowhere"),
                "rerun `remora-proxy init --remove` and then `remora-proxy init`",
            )),
            Some(port) if !all.iter().any(|l| l.port == port) => out.push(Finding::error(
                &subject,
                format!("stale: {chain} redirects to port {port}, where nothing listens: every intercepted connection is refused"),
                format!("start the proxy on port {port}, or rerun `remora-proxy init` with the ports the proxy uses"),
            )),
            Some(port) if chain == OUTBOUND_CHAIN => {
                let owner = save
                    .lines()
                    .filter(|l| l.starts_with(&format!("-A {chain} ")))
                    .find_map(|l| l.split_once("--uid-owner ").and_then(|(_, u)| u.split_whitespace().next()))
                    .and_then(|u| u.parse::<u32>().ok());
                let proxy_uids: Vec<u32> = all.iter().filter(|l| l.port == port).map(|l| l.uid).collect();
                match owner {
                    None => out.push(Finding::error(
                        &subject,
                        "stale: no rule exempts the proxy's own connections, so they loop back into it",
                        "rerun `remora-proxy init --remove` and then `remora-proxy init --proxy-uid UID`",
                    )),
                    Some(uid) if !proxy_uids.contains(&uid) => out.push(Finding::error(
                        &subject,
                        format!(
                            "stale: the rules exempt uid {uid} but the proxy on port {port} runs as uid {}: its own connections loop back into it",
                            proxy_uids.first().copied().unwrap_or_default()
                        ),
                        format!(
                            "run the proxy as uid {uid}, or rerun `remora-proxy init --proxy-uid {}`",
                            proxy_uids.first().copied().unwrap_or_default()
                        ),
                    )),
                    Some(_) => {}
                }
            }
            _ => {}
        }
    }
    if out.is_empty() {
        out.push(Finding::ok(
            subject,
            "present, and sending to the running proxy",
        ));
    }
    out
}

/// The uid the interception rules exempt (the proxy's), if rules are present.
pub fn exempt_uid(save: &str) -> Option<u32> {
    save.lines()
        .filter(|l| l.starts_with(&format!("-A {OUTBOUND_CHAIN} ")))
        .find_map(|l| {
            l.split_once("--uid-owner ")
                .and_then(|(_, u)| u.split_whitespace().next())
        })
        .and_then(|u| u.parse().ok())
}

/// Reads this namespace's sockets and rules and checks both.
pub fn gather(app_ports: &[u16]) -> Vec<Finding> {
    let mut all = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            all.extend(listeners(&text));
        }
    }
    let mut out = Vec::new();
    let mut uid = None;
    for (family, cmd) in [("IPv4", "iptables-save"), ("IPv6", "ip6tables-save")] {
        match std::process::Command::new(cmd).args(["-t", "nat"]).output() {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                uid = uid.or(exempt_uid(&text));
                // No IPv6 stack here: nothing to intercept.
                if family == "IPv6" && !std::path::Path::new("/proc/net/if_inet6").exists() {
                    continue;
                }
                out.extend(rules(family, &text, &all));
            }
            Ok(o) => out.push(Finding::warning(
                format!("{family} interception rules"),
                format!(
                    "{cmd} failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                "run remora check as root (CAP_NET_ADMIN) in the pod's network namespace",
            )),
            Err(e) => out.push(Finding::warning(
                format!("{family} interception rules"),
                format!("cannot run {cmd}: {e}"),
                "install iptables (the nft backend is fine) where remora check runs",
            )),
        }
    }
    out.extend(sockets(&all, app_ports, uid));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_parses_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  2102        0 1 1 0\n   1: 0100007F:1F91 0200007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n";
        assert_eq!(
            listeners(v4),
            [Listener {
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080,
                uid: 2102
            }]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     7        0 3 1 0\n";
        assert_eq!(
            listeners(v6),
            [Listener {
                addr: "::1".parse().unwrap(),
                port: 8080,
                uid: 7
            }]
        );
    }

    fn l(addr: &str, port: u16, uid: u32) -> Listener {
        Listener {
            addr: addr.parse().unwrap(),
            port,
            uid,
        }
    }

    #[test]
    fn app_addresses_table() {
        use crate::check::Severity::*;
        let cases: &[(&[Listener], &[u16], &[crate::check::Severity])] = &[
            (&[l("0.0.0.0", 8080, 0)], &[8080], &[Ok]),
            (&[l("127.0.0.1", 8080, 0)], &[8080], &[Warning]),
            (&[l("10.1.0.5", 8080, 0)], &[8080], &[Error]),
            (
                &[l("10.1.0.5", 8080, 0), l("127.0.0.1", 8080, 0)],
                &[8080],
                &[Ok],
            ),
            (&[], &[8080], &[Error]),
            // The proxy's own sockets are not the application's.
            (
                &[l("127.0.0.1", 4140, 2102), l("0.0.0.0", 9000, 2102)],
                &[],
                &[],
            ),
        ];
        for (all, ports, want) in cases {
            let got: Vec<_> = sockets(all, ports, Some(2102))
                .iter()
                .map(|f| f.severity)
                .collect();
            assert_eq!(&got, want, "{all:?} {ports:?}");
        }
    }

    const RULES: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:REMORA_INBOUND - [0:0]\n:REMORA_OUTBOUND - [0:0]\n-A PREROUTING -p tcp -j REMORA_INBOUND\n-A OUTPUT -p tcp -j REMORA_OUTBOUND\n-A REMORA_INBOUND -p tcp -m tcp --dport 4191 -j RETURN\n-A REMORA_INBOUND -p tcp -j REDIRECT --to-ports 4143\n-A REMORA_OUTBOUND -m owner --uid-owner 2102 -j RETURN\n-A REMORA_OUTBOUND -o lo -j RETURN\n-A REMORA_OUTBOUND -p tcp -j REDIRECT --to-ports 4140\nCOMMIT\n";

    #[test]
    fn interception_rules_table() {
        let proxy = [l("0.0.0.0", 4143, 2102), l("127.0.0.1", 4140, 2102)];
        let problems = |save: &str, all: &[Listener]| -> Vec<String> {
            rules("IPv4", save, all)
                .into_iter()
                .filter(|f| f.severity != crate::check::Severity::Ok)
                .map(|f| f.problem)
                .collect()
        };
        assert!(problems(RULES, &proxy).is_empty());
        assert!(problems("*nat\nCOMMIT\n", &proxy)[0].starts_with("missing"));
        let no_jump = RULES.replace("-A OUTPUT -p tcp -j REMORA_OUTBOUND\n", "");
        assert!(problems(&no_jump, &proxy)[0].contains("not jumped to from OUTPUT"));
        let p = problems(RULES, &proxy[..1]);
        assert!(p[0].contains("port 4140, where nothing listens"), "{p:?}");
        let other_uid = [l("0.0.0.0", 4143, 1000), l("127.0.0.1", 4140, 1000)];
        let p = problems(RULES, &other_uid);
        assert!(
            p[0].contains("exempt uid 2102 but the proxy on port 4140 runs as uid 1000"),
            "{p:?}"
        );
        assert_eq!(exempt_uid(RULES), Some(2102));
    }
}
