//! An identity directory (`tls.crt`, `tls.key`, `ca.crt`): does it load, does the chain verify
//! to the bundle, is it expired or about to be.

use std::path::Path;
use std::time::{Duration, SystemTime};

use remora_certs::validate::{self, Problem};

use super::Finding;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Checks `dir` as of `now`.
pub fn identity_dir(dir: &Path, now: SystemTime) -> Vec<Finding> {
    let read = |f: &str| std::fs::read(dir.join(f));
    let (chain, key, bundle) = match (read("tls.crt"), read("tls.key"), read("ca.crt")) {
        (Ok(c), Ok(k), Ok(b)) => (c, k, b),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return vec![Finding::error(
                dir.display().to_string(),
                format!("not a complete identity directory: {e}"),
                "point --identity-dir at the proxy's REMORA_IDENTITY_DIR, which holds tls.crt, tls.key and ca.crt",
            )];
        }
    };
    match validate::validate(dir, &chain, &key, &bundle, now) {
        Err(e) => {
            let fix = match &e.problem {
                Problem::Expired(_) => {
                    "a proxy in control mode renews it before expiry: check that it reaches the control plane (remora check --control); for files you manage, issue a new one with `remora cert issue`"
                }
                Problem::NotYetValid(_) => {
                    "this machine's clock is behind the issuer's: fix NTP on the node (certificates are backdated one minute, no more)"
                }
                Problem::Untrusted(_) => {
                    "the certificate was signed by a CA this bundle does not hold: issue it from the CA whose ca.crt is here, or put that CA's ca.crt in the bundle"
                }
                Problem::KeyMismatch => {
                    "tls.key and tls.crt were written from different issuances: write both from the same one"
                }
                Problem::NoIdentity => {
                    "mesh certificates carry a spiffe:// URI SAN: issue it with `remora cert issue --identity spiffe://…`"
                }
                Problem::Unreadable(_)
                | Problem::Empty
                | Problem::NoPem(_)
                | Problem::Garbage(_) => {
                    "rewrite the file from its source (the control plane writes it in control mode; `remora cert issue` otherwise)"
                }
            };
            vec![Finding::error(
                e.file.display().to_string(),
                e.problem.to_string(),
                fix,
            )]
        }
        Ok(creds) => {
            let subject = dir.join("tls.crt").display().to_string();
            let life = creds
                .not_after
                .duration_since(creds.not_before)
                .unwrap_or_default();
            let left = creds.not_after.duration_since(now).unwrap_or_default();
            // A short-lived certificate (a day or less) is always "within a day" of expiring;
            // for it the sign of trouble is a renewal that is overdue (proxies renew at 70 %).
            let soon = if life > DAY {
                left < DAY
            } else {
                left < life.mul_f64(0.2)
            };
            let until = validate::human_time(creds.not_after);
            if soon {
                vec![Finding::warning(
                    subject,
                    format!(
                        "{} expires soon ({until}, in {})",
                        creds.id,
                        humantime::format_duration(Duration::from_secs(left.as_secs()))
                    ),
                    "renew it now: a control-mode proxy that has not renewed cannot reach the control plane (remora check --control); otherwise `remora cert issue`",
                )]
            } else {
                vec![Finding::ok(
                    subject,
                    format!("{} valid until {until}, verifies to ca.crt", creds.id),
                )]
            }
        }
    }
}
