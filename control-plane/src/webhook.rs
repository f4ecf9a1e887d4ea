//! The mutating admission webhook: the API server sends each Pod created in a namespace
//! labelled `remora.io/inject=enabled` (the selector `remora install` writes), and gets back
//! a JSON Patch adding the same sidecar `remora inject` adds ([`crate::inject::inject_pod`]).
//!
//! [`review`] is the whole decision, a pure function of the AdmissionReview and the settings;
//! [`Webhook::serve`] wraps it in HTTPS with a certificate from the mesh issuer whose names are the
//! control plane's Service (`remora-control.remora.svc`), renewed well before it expires.
//! The webhook configuration's `failurePolicy: Ignore` means a control plane that is down
//! never blocks pod creation; a pod whose remora annotations are wrong is refused with a
//! message naming the annotation, since injecting it wrongly or not at all would fail later
//! and more quietly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::inject::{Outcome, Settings, inject_pod};
use crate::issuer::Issuer;

/// The path the webhook configuration names.
pub const PATH: &str = "/inject";
/// An AdmissionReview holds the object (and, on updates, the old one); objects are at most
/// about 1.5 MiB in etcd, so 4 MiB bounds a genuine review with room to spare.
const MAX_REVIEW_BYTES: usize = 4 << 20;
/// The webhook certificate lives a day and is renewed every hour.
const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const CERT_RENEW: Duration = Duration::from_secs(3600);

/// The DNS names the API server uses for the control plane's Service, plus `extra` (an
/// address the webhook configuration names by URL instead).
pub fn server_names(cluster_domain: &str, extra: &[String]) -> Vec<String> {
    let svc = "remora-control.remora.svc";
    let mut names = vec![
        svc.to_string(),
        format!("{svc}.{cluster_domain}"),
        "remora-control.remora".to_string(),
    ];
    names.extend(extra.iter().cloned());
    names
}

/// Answers one AdmissionReview (`admission.k8s.io/v1`). Never fails: a review it cannot read
/// gets a refusal naming what is wrong.
pub fn review(body: &[u8], s: &Settings) -> Value {
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    let Ok(req) = parsed else {
        return answer(
            "",
            Err("the request is not an AdmissionReview (JSON)".into()),
        );
    };
    let uid = req["request"]["uid"].as_str().unwrap_or("").to_string();
    answer(&uid, decide(&req["request"], s))
}

/// `Ok(Some(patch))` to inject, `Ok(None)` to admit unchanged, `Err` to refuse.
fn decide(request: &Value, s: &Settings) -> Result<Option<Value>, String> {
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return Ok(None);
    }
    let object = &request["object"];
    let what = format!(
        "Pod {}/{}",
        request["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"]
            .as_str()
            .or(object["metadata"]["generateName"].as_str())
            .unwrap_or("")
    );
    let mut pod = match serde_yaml::to_value(object) {
        Ok(serde_yaml::Value::Mapping(m)) => m,
        _ => return Err(format!("{what}: the object is not a mapping")),
    };
    match inject_pod(&mut pod, s).map_err(|e| format!("{what}: {e}"))? {
        Outcome::Injected => {}
        Outcome::AlreadyInjected | Outcome::OptedOut | Outcome::Skipped(_) => return Ok(None),
    }
    let pod = serde_json::to_value(&pod).map_err(|e| format!("{what}: {e}"))?;
    // "add" replaces a member that exists and creates one that does not; `inject_pod` only
    // touches the annotations and the spec, so those two replace the old ones whole.
    Ok(Some(json!([
        {"op": "add", "path": "/metadata/annotations", "value": pod["metadata"]["annotations"]},
        {"op": "add", "path": "/spec", "value": pod["spec"]},
    ])))
}

fn answer(uid: &str, decision: Result<Option<Value>, String>) -> Value {
    let response = match decision {
        Ok(None) => json!({"uid": uid, "allowed": true}),
        Ok(Some(patch)) => json!({
            "uid": uid,
            "allowed": true,
            "patchType": "JSONPatch",
            "patch": crate::base64::encode(patch.to_string().as_bytes()),
        }),
        Err(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 400, "message": format!("remora: {message}")},
        }),
    };
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// A rustls server config for `names`, signed by the current issuer.
fn tls_config(issuer: &Issuer, names: &[String]) -> Result<Arc<rustls::ServerConfig>, String> {
    let signing = issuer.current();
    let (chain, key) = signing
        .issuer
        .issue_server(names, CERT_LIFETIME)
        .map_err(|e| format!("webhook certificate: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("webhook certificate: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| format!("webhook key: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(remora_certs::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("webhook certificate: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What the webhook server needs.
pub struct Webhook {
    pub listener: TcpListener,
    pub issuer: Arc<Issuer>,
    pub names: Vec<String>,
    pub settings: Settings,
}

impl Webhook {
    /// Makes the first certificate, so a broken issuer is an error at start, not at the first
    /// pod.
    pub fn check(&self) -> Result<(), String> {
        tls_config(&self.issuer, &self.names).map(drop)
    }

    pub async fn serve(self, stop: tokio_util::sync::CancellationToken) {
        let tls = match tls_config(&self.issuer, &self.names) {
            Ok(c) => Arc::new(ArcSwap::new(c)),
            Err(e) => {
                tracing::error!("{e}; the injection webhook is off");
                return;
            }
        };
        {
            let (tls, issuer, names) = (tls.clone(), self.issuer.clone(), self.names.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(CERT_RENEW).await;
                    match tls_config(&issuer, &names) {
                        Ok(c) => tls.store(c),
                        Err(e) => tracing::warn!("{e}; keeping the previous one"),
                    }
                }
            });
        }
        let settings = Arc::new(self.settings);
        loop {
            let (tcp, peer) = tokio::select! {
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
            let (settings, stop) = (settings.clone(), stop.clone());
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => s,
                        _ => {
                            tracing::debug!(%peer, "webhook TLS handshake failed or timed out");
                            return;
                        }
                    };
                serve_conn(stream, peer, settings, stop).await;
            });
        }
    }
}

async fn serve_conn(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    settings: Arc<Settings>,
    stop: tokio_util::sync::CancellationToken,
) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let settings = settings.clone();
        async move { Ok::<_, Infallible>(handle(req, &settings).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "webhook connection ended");
        },
        _ = stop.cancelled() => {}
    }
}

async fn handle(req: Request<Incoming>, s: &Settings) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut rsp = Response::new(Full::new(Bytes::from(body)));
        *rsp.status_mut() = status;
        rsp
    };
    if req.uri().path() != PATH {
        return reply(
            StatusCode::NOT_FOUND,
            format!("no {}; the webhook is at {PATH}\n", req.uri().path()),
        );
    }
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview\n".into(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the AdmissionReview could not be read (at most {MAX_REVIEW_BYTES} bytes): {e}\n"
                ),
            );
        }
    };
    let answer = review(&body, s);
    if let Some(msg) = answer["response"]["status"]["message"].as_str() {
        tracing::warn!("injection refused: {msg}");
    } else if answer["response"]["patch"].is_string() {
        tracing::debug!("injected a pod");
    }
    let mut rsp = reply(StatusCode::OK, answer.to_string());
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            trust_bundle: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            trust_domain: "cluster.local".into(),
            control_addr: crate::inject::DEFAULT_CONTROL_ADDR.into(),
            proxy_image: "remora-proxy:test".into(),
            classic: false,
        }
    }

    fn pod_review(annotations: Value, operation: &str) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "shop",
                "operation": operation,
                "object": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"generateName": "web-", "annotations": annotations},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]},
                },
            },
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_pod_gets_a_patch_that_adds_the_sidecar() {
        let a = review(&pod_review(json!({"team": "a"}), "CREATE"), &settings());
        let r = &a["response"];
        assert_eq!(r["uid"], "u-1");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch: Value =
            serde_json::from_slice(&crate::base64::tests::decode(r["patch"].as_str().unwrap()))
                .unwrap();
        assert_eq!(patch[0]["path"], "/metadata/annotations");
        assert_eq!(patch[0]["value"]["team"], "a", "existing annotations kept");
        assert!(patch[0]["value"][crate::inject::INJECTED].is_string());
        let spec = &patch[1]["value"];
        assert_eq!(spec["initContainers"][0]["name"], "remora-init");
        assert_eq!(spec["initContainers"][1]["name"], "remora-proxy");
        assert_eq!(spec["containers"][0]["name"], "web");
    }

    #[test]
    fn what_is_not_injected_is_admitted_unchanged() {
        let s = settings();
        for (annotations, op) in [
            (json!({"remora.io/inject": "disabled"}), "CREATE"),
            (json!({"remora.io/injected": "0.1.0"}), "CREATE"),
            (json!({}), "UPDATE"),
        ] {
            let a = review(&pod_review(annotations.clone(), op), &s);
            assert_eq!(a["response"]["allowed"], true, "{annotations} {op}");
            assert!(a["response"]["patch"].is_null(), "{annotations} {op}");
        }
    }

    #[test]
    fn bad_annotations_and_bad_reviews_are_refused_by_name() {
        let a = review(
            &pod_review(json!({"remora.io/opaque-ports": "http"}), "CREATE"),
            &settings(),
        );
        assert_eq!(a["response"]["allowed"], false);
        let msg = a["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains("Pod shop/web-"), "{msg}");
        assert!(msg.contains("remora.io/opaque-ports"), "{msg}");
        let a = review(b"{not json", &settings());
        assert_eq!(a["response"]["allowed"], false);
        assert!(
            a["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("not an AdmissionReview")
        );
    }
}
