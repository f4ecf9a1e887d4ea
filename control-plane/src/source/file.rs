//! The file source: services and their endpoints in one TOML file, for machines without
//! Kubernetes and for `remora demo`.
//!
//! ```toml
//! [[service]]
//! name = "web.shop.svc.cluster.local:8080"      # host:port, as clients address it
//! endpoints = [
//!   { addr = "10.0.0.7:8080", identity = "spiffe://cluster.local/ns/shop/sa/web" },
//!   { addr = "10.0.0.8:8080", weight = 2 },     # no identity: plaintext to it
//! ]
//! ```
//!
//! The file is polled by content (like certificates, so editors, `mv` and Kubernetes'
//! ConfigMap symlink swaps all work). A new version is validated whole before it replaces the
//! table; an invalid one is refused with the line at fault, and the last good one keeps serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use remora_certs::SpiffeId;
use remora_proxy::EndpointSpec;
use serde::Deserialize;
use toml::Spanned;

use crate::registry::{Registry, Table};

/// How often the file is read for changes.
pub const POLL: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    service: Vec<Service>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    name: Spanned<String>,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoint {
    addr: Spanned<String>,
    identity: Option<Spanned<String>>,
    weight: Option<Spanned<u32>>,
}

/// Parses and validates a whole endpoints file. Errors name the file and line.
pub fn parse(path: &Path, text: &str) -> Result<Table, String> {
    let line = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let at =
        |offset: usize, msg: String| format!("{}: line {}: {msg}", path.display(), line(offset));
    let file: File = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => at(span.start, e.message().to_string()),
        None => format!("{}: {}", path.display(), e.message()),
    })?;
    let mut table = HashMap::new();
    for s in file.service {
        let name = remora_proxy::config::normalize_authority(s.name.get_ref())
            .filter(|n| {
                n.rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            })
            .ok_or_else(|| {
                at(
                    s.name.span().start,
                    format!(
                        "service name {:?} is not host:port (e.g. web.shop.svc.cluster.local:8080)",
                        s.name.get_ref()
                    ),
                )
            })?;
        let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(s.endpoints.len());
        for e in s.endpoints {
            let addr = e.addr.get_ref().parse().map_err(|_| {
                at(
                    e.addr.span().start,
                    format!("endpoint address {:?} is not ip:port", e.addr.get_ref()),
                )
            })?;
            if endpoints.iter().any(|x| x.addr == addr) {
                return Err(at(
                    e.addr.span().start,
                    format!("endpoint {addr} is listed twice in {name}"),
                ));
            }
            let identity = match &e.identity {
                None => None,
                Some(id) => Some(id.get_ref().parse::<SpiffeId>().map_err(|err| {
                    at(
                        id.span().start,
                        format!("identity {:?}: {err}", id.get_ref()),
                    )
                })?),
            };
            let weight = match &e.weight {
                None => 1,
                Some(w) if (1..=remora_proxy::config::MAX_WEIGHT).contains(w.get_ref()) => {
                    *w.get_ref()
                }
                Some(w) => {
                    return Err(at(
                        w.span().start,
                        format!(
                            "weight {} is out of range 1..={}",
                            w.get_ref(),
                            remora_proxy::config::MAX_WEIGHT
                        ),
                    ));
                }
            };
            endpoints.push(EndpointSpec {
                addr,
                weight,
                identity,
            });
        }
        if table.insert(name.clone(), endpoints).is_some() {
            return Err(at(
                s.name.span().start,
                format!("service {name} is defined twice"),
            ));
        }
    }
    Ok(table)
}

/// Follows one endpoints file.
pub struct FileSource {
    pub path: PathBuf,
    /// The bytes [`FileSource::load`] applied, so a change made before `run` starts is seen.
    loaded: Option<Vec<u8>>,
}

/// Parses file bytes, refusing an empty file: that is what a write in progress looks like, and
/// applying it would delete every service.
fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Table, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    if text.trim().is_empty() {
        return Err(format!(
            "{}: the file is empty (a write in progress?); to serve no services on purpose, write a comment such as `# no services`",
            path.display()
        ));
    }
    parse(path, text)
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        FileSource { path, loaded: None }
    }

    /// Reads and validates the file once (startup: a bad file is a startup error).
    pub fn load(&mut self) -> Result<Table, String> {
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("{}: cannot read: {e}", self.path.display()))?;
        let table = parse_bytes(&self.path, &bytes)?;
        self.loaded = Some(bytes);
        Ok(table)
    }

    /// Polls forever, replacing the registry's table on every valid change. `reloads` counts
    /// outcomes for /metrics.
    pub async fn run(self, registry: Arc<Registry>, metrics: Arc<crate::metrics::Metrics>) {
        let mut last = self.loaded.clone();
        loop {
            let bytes = std::fs::read(&self.path);
            let changed = match &bytes {
                Ok(b) => last.as_ref() != Some(b),
                Err(_) => last.is_some(),
            };
            if changed {
                let result = match &bytes {
                    Ok(b) => parse_bytes(&self.path, b),
                    Err(e) => Err(format!("{}: cannot read: {e}", self.path.display())),
                };
                match result {
                    Ok(table) => {
                        tracing::info!(
                            services = table.len(),
                            endpoints = table.values().map(Vec::len).sum::<usize>(),
                            "endpoints loaded from {}",
                            self.path.display()
                        );
                        registry.replace_all(table);
                        metrics.source_reloads.inc();
                        crate::release_memory();
                    }
                    Err(e) => {
                        metrics.source_reload_failures.inc();
                        tracing::warn!("endpoints file {e}; keeping the previous endpoints");
                    }
                }
                last = Some(bytes.unwrap_or_default());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Table, String> {
        parse(Path::new("eps.toml"), text)
    }

    #[test]
    fn parses_services_identities_and_weights() {
        let t = p(r#"
[[service]]
name = "Web.Shop.svc.cluster.local:8080"
endpoints = [
  { addr = "10.0.0.7:8080", identity = "spiffe://cluster.local/ns/shop/sa/web" },
  { addr = "10.0.0.8:8080", weight = 2 },
]
[[service]]
name = "empty:80"
"#)
        .unwrap();
        let web = &t["web.shop.svc.cluster.local:8080"];
        assert_eq!(web.len(), 2);
        assert_eq!(
            web[0].identity.as_ref().unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(web[1].weight, 2);
        assert!(t["empty:80"].is_empty());
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "[[service]]\nname = \"a:1\"\nendpoints = [{ addr = \"nope\" }]\n",
                "line 3",
                "not ip:port",
            ),
            ("[[service]]\nname = \"a\"\n", "line 2", "not host:port"),
            (
                "[[service]]\nname = \"a:1\"\nendpoints = [\n {addr=\"1.2.3.4:5\", identity=\"http://x/bad\"}]\n",
                "line 4",
                "identity",
            ),
            (
                "[[service]]\nname = \"a:1\"\nendpoints = [{ addr = \"1.2.3.4:5\", weight = 0 }]\n",
                "line 3",
                "weight 0",
            ),
            (
                "[[service]]\nname = \"a:1\"\n[[service]]\nname = \"a:1\"\n",
                "line 4",
                "defined twice",
            ),
            (
                "[[service]]\nname = \"a:1\"\nendpoint = []\n",
                "line 3",
                "endpoint",
            ),
            ("[[service]\n", "line 1", ""),
        ];
        for (text, line, what) in cases {
            let e = p(text).unwrap_err();
            assert!(
                e.starts_with("eps.toml: ") && e.contains(line) && e.contains(what),
                "{text:?} gave {e}"
            );
        }
    }
}
