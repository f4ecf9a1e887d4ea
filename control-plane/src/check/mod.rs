//! `remora check`: finds what stops a meshed pod from working and says how to fix it, one
//! finding per problem, each with the fix in one sentence. It looks at whatever it is given:
//! an identity directory ([`identity`]), a proxy's admin port and a control plane
//! ([`remote`]), a manifest ([`manifest`]), the network namespace it runs in (listening
//! sockets and interception rules, [`local`]), or a cluster ([`cluster`]).
//!
//! Each diagnosis is a pure function of what was read (files, `/proc/net/tcp`,
//! `iptables-save`, API objects), so each is tested on its own; the gathering is thin.

pub mod cluster;
pub mod identity;
pub mod local;
pub mod manifest;
pub mod remote;

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Breaks traffic now; `remora check` exits non-zero.
    Error,
    /// Will break traffic in some case, or soon.
    Warning,
    /// Checked and fine (printed so a clean run shows what was looked at).
    Ok,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// What the finding is about: a file, a port, a pod, an address.
    pub subject: String,
    pub problem: String,
    /// One sentence; empty for `Ok`.
    pub fix: String,
}

impl Finding {
    pub fn error(
        subject: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Finding {
            severity: Severity::Error,
            subject: subject.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub fn warning(
        subject: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Finding {
            severity: Severity::Warning,
            ..Finding::error(subject, problem, fix)
        }
    }

    pub fn ok(subject: impl Into<String>, what: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Ok,
            ..Finding::error(subject, what, "")
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Ok => "ok",
        };
        write!(f, "{tag}: {}: {}", self.subject, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Whether any finding is an error (the exit status).
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}
