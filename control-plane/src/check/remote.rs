//! Things `remora check` asks over the network: a proxy's readiness on its admin port, and a
//! control plane's answer to a real Certify call (reachable, TLS identity, token accepted,
//! clock skew read from the certificate it signs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Finding;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Certificates are backdated by this much when signed (`remora_certs::ca`).
const BACKDATE: Duration = Duration::from_secs(60);
/// Peers allow this much skew (`remora_certs::validate::CLOCK_SKEW`); warn at half of it.
const SKEW: Duration = remora_certs::validate::CLOCK_SKEW;

/// `GET /ready` on a proxy's admin address.
pub async fn proxy_admin(addr: SocketAddr) -> Vec<Finding> {
    let subject = format!("proxy admin {addr}");
    let ask = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /ready HTTP/1.1\r\nHost: remora-check\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        tcp.take(64 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = match tokio::time::timeout(TIMEOUT, ask).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return vec![Finding::error(
                subject,
                format!("unreachable: {e}"),
                "check that the proxy runs and that this is its REMORA_ADMIN_ADDR (4191 in an injected pod)",
            )];
        }
        Err(_) => {
            return vec![Finding::error(
                subject,
                format!("no answer within {TIMEOUT:?}"),
                "check that this is the proxy's admin address and that nothing filters it",
            )];
        }
    };
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .unwrap_or("");
    match status {
        Some(200) => vec![Finding::ok(subject, "ready")],
        Some(code) => vec![Finding::error(
            subject,
            format!("not ready (HTTP {code}): {body}"),
            "fix what the proxy names above; its log says the same with more detail",
        )],
        None => vec![Finding::error(
            subject,
            "answered, but not with HTTP: this is not a proxy's admin port",
            "use the proxy's REMORA_ADMIN_ADDR (4191 in an injected pod)",
        )],
    }
}

/// What a Certify call needs.
pub struct ControlCheck {
    pub addr: String,
    /// The trust bundle that verifies the control plane.
    pub bundle: PathBuf,
    /// The identity to ask for (the workload's).
    pub identity: remora_certs::SpiffeId,
    pub token_file: PathBuf,
}

/// A real Certify call: the control plane is reachable and proves its identity, accepts the
/// token for this identity, and its clock agrees with ours.
pub async fn control(c: ControlCheck) -> Vec<Finding> {
    let subject = format!("control plane {}", c.addr);
    let token = match std::fs::read_to_string(&c.token_file) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            return vec![Finding::error(
                c.token_file.display().to_string(),
                format!("cannot read the token: {e}"),
                "pass the proxy's REMORA_IDENTITY_TOKEN file (/var/run/remora/token/token in an injected pod)",
            )];
        }
    };
    let td = c.identity.trust_domain().to_string();
    let client = match remora_api::client::ControlClient::new(
        vec![c.addr.clone()],
        None,
        c.bundle.clone(),
        Arc::new(move || Some(td.clone())),
    ) {
        Ok(cl) => cl,
        Err(e) => return vec![Finding::error(subject, e, "pass --control HOST:PORT")],
    };
    let (_key, csr) = match remora_certs::ca::new_key_and_csr(&c.identity) {
        Ok(k) => k,
        Err(e) => {
            return vec![Finding::error(
                subject,
                e.to_string(),
                "report this as a bug",
            )];
        }
    };
    let req = remora_api::CertifyRequest {
        identity: c.identity.to_string(),
        token,
        csr,
    };
    let answer = tokio::time::timeout(TIMEOUT * 2, client.identity().certify(req)).await;
    let rsp = match answer {
        Err(_) => {
            return vec![Finding::error(
                subject,
                "no answer in time",
                "check that the control plane is ready (its /ready on port 9996) and not overloaded",
            )];
        }
        Ok(Err(status)) => {
            use tonic::Code;
            let msg = status.message().to_string();
            return vec![match status.code() {
                Code::Unauthenticated | Code::PermissionDenied => Finding::error(
                    subject,
                    format!("refuses the token for {}: {msg}", c.identity),
                    "the token must be this ServiceAccount's, projected with audience `remora` (an injected pod's is), or a bootstrap token listed for this identity",
                ),
                // The handshake verifies the control plane's certificate by this clock.
                Code::Unavailable | Code::Unknown if time_refusal(&msg) => Finding::error(
                    subject,
                    format!(
                        "its certificate is not valid by this clock ({msg}): the clocks differ by more than the 60 s remora allows"
                    ),
                    "fix NTP on the nodes",
                ),
                Code::Unavailable | Code::Unknown => Finding::error(
                    subject,
                    format!("unreachable: {msg}"),
                    "check REMORA_CONTROL_ADDR, that the control plane is ready, and that the trust bundle is the one it was installed with",
                ),
                code => Finding::error(
                    subject,
                    format!("Certify failed ({code:?}): {msg}"),
                    "read the control plane's log for this request",
                ),
            }];
        }
        Ok(Ok(r)) => r.into_inner(),
    };
    let now = SystemTime::now();
    let mut out = vec![Finding::ok(
        &subject,
        format!("reachable; it accepts the token and signs {}", c.identity),
    )];
    let issued_at = remora_certs::validate::parse_certs(&c.bundle, rsp.chain.as_bytes())
        .ok()
        .and_then(|chain| {
            chain
                .first()
                .and_then(|l| remora_certs::validate::validity(l))
        })
        .map(|(not_before, _)| not_before + BACKDATE);
    if let Some(theirs) = issued_at {
        out.extend(skew(&subject, now, theirs));
    }
    out
}

/// Whether a connect error is the peer's certificate failing on time (`NotValidYet`,
/// `Expired` in rustls' words).
fn time_refusal(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase().replace(' ', "");
    m.contains("notvalidyet") || m.contains("expired")
}

/// Compares our clock (`ours`) with the control plane's (`theirs`).
pub fn skew(subject: &str, ours: SystemTime, theirs: SystemTime) -> Vec<Finding> {
    let (d, dir) = match ours.duration_since(theirs) {
        Ok(d) => (d, "ahead of"),
        Err(e) => (e.duration(), "behind"),
    };
    let d = Duration::from_secs(d.as_secs());
    let text = format!(
        "this clock is {} {dir} the control plane's",
        humantime::format_duration(d)
    );
    if d > SKEW {
        vec![Finding::error(
            subject,
            format!("{text}: peers see its certificates as not yet valid or expired"),
            "fix NTP on the nodes (remora allows 60 s of skew)",
        )]
    } else if d > SKEW / 2 {
        vec![Finding::warning(
            subject,
            format!("{text}: close to the 60 s remora allows"),
            "fix NTP on the nodes",
        )]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_table() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let sev = |ours: SystemTime| skew("cp", ours, t).first().map(|f| f.severity);
        use crate::check::Severity::*;
        assert_eq!(sev(t + Duration::from_secs(5)), None);
        assert_eq!(sev(t + Duration::from_secs(45)), Some(Warning));
        assert_eq!(sev(t + Duration::from_secs(120)), Some(Error));
        assert_eq!(sev(t - Duration::from_secs(120)), Some(Error));
        assert!(
            skew("cp", t - Duration::from_secs(120), t)[0]
                .problem
                .contains("behind")
        );
    }
}
