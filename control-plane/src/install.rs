//! `remora install`: every object a cluster needs for remora, as plain YAML for
//! `remora install | kubectl apply -f -`. Zero CRDs: a Namespace, the control plane's
//! ServiceAccount and least-privilege ClusterRole/Binding ([`RULES`]), the CA
//! Secret (ca.crt, issuer.crt, issuer.key; never the root key), the control plane Deployment
//! (two replicas, probes, resources, hardened) with its PodDisruptionBudget and Service, and
//! the injection webhook's configuration (pods of namespaces labelled
//! `remora.io/inject=enabled`; `failurePolicy: Ignore`, so a control plane that is down never
//! blocks pod creation).
//!
//! Names, ports and the namespace are the contract injected pods rely on
//! ([`crate::inject::DEFAULT_CONTROL_ADDR`]).

use crate::source::permission::{CLUSTER_ROLE, RULES};

pub const NAMESPACE: &str = "remora";
pub const SERVICE: &str = "remora-control";
pub const SECRET: &str = "remora-ca";
pub const WEBHOOK: &str = "remora-inject";
pub const GRPC_PORT: u16 = 8086;
pub const WEBHOOK_PORT: u16 = 8443;
pub const ADMIN_PORT: u16 = 9996;
/// Replicas of the control plane: one can be drained or rescheduled while the other serves.
pub const REPLICAS: u32 = 2;

/// The CA the control plane signs with: the files of `remora ca init` but `root.key`.
pub struct CaFiles {
    pub ca_crt: String,
    pub issuer_crt: String,
    pub issuer_key: String,
}

pub struct Settings {
    pub ca: CaFiles,
    pub trust_domain: String,
    pub cluster_domain: String,
    pub control_image: String,
    pub proxy_image: String,
    /// The cluster's minor version (1.N): below 21 the PodDisruptionBudget is
    /// `policy/v1beta1`, below 29 the webhook injects the proxy as a regular container.
    pub kube_minor: u32,
    /// The webhook by URL instead of through the Service (a control plane outside the cluster).
    pub webhook_url: Option<String>,
}

/// A YAML double-quoted scalar (a JSON string is one).
fn q(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn b64(s: &str) -> String {
    crate::base64::encode(s.as_bytes())
}

/// The whole manifest, documents separated by `---`.
pub fn manifests(s: &Settings) -> String {
    let mut docs = vec![
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    # The control plane is not meshed by its own webhook.\n    remora.io/inject: disabled\n"
        ),
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {SERVICE}\n  namespace: {NAMESPACE}\n"
        ),
    ];
    let rules: String = RULES
        .iter()
        .map(|r| format!("  - {}\n", r.yaml()))
        .collect();
    docs.push(format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {CLUSTER_ROLE}\nrules:\n{rules}"
    ));
    docs.push(format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {CLUSTER_ROLE}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {CLUSTER_ROLE}\nsubjects:\n  - kind: ServiceAccount\n    name: {SERVICE}\n    namespace: {NAMESPACE}\n"
    ));
    docs.push(format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {SECRET}\n  namespace: {NAMESPACE}\ntype: Opaque\ndata:\n  ca.crt: {}\n  issuer.crt: {}\n  issuer.key: {}\n",
        b64(&s.ca.ca_crt),
        b64(&s.ca.issuer_crt),
        b64(&s.ca.issuer_key)
    ));
    let classic = if s.kube_minor < 29 {
        "\n            - --inject-classic"
    } else {
        ""
    };
    docs.push(format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {SERVICE}
  namespace: {NAMESPACE}
  labels: {{app.kubernetes.io/name: {SERVICE}, app.kubernetes.io/part-of: remora}}
spec:
  replicas: {REPLICAS}
  selector:
    matchLabels: {{app.kubernetes.io/name: {SERVICE}}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: {SERVICE}, app.kubernetes.io/part-of: remora}}
    spec:
      serviceAccountName: {SERVICE}
      # One replica per node where the cluster allows it.
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels: {{app.kubernetes.io/name: {SERVICE}}}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {{type: RuntimeDefault}}
      containers:
        - name: control
          image: {image}
          args:
            - control
            - --kubernetes
            - --token-review
            - --token-audience
            - remora
            - --issuer
            - /var/run/remora/ca
            - --trust-domain
            - {td}
            - --cluster-domain
            - {cd}
            - --webhook-addr
            - 0.0.0.0:{WEBHOOK_PORT}
            - --proxy-image
            - {proxy}{classic}
          ports:
            - {{name: grpc, containerPort: {GRPC_PORT}, protocol: TCP}}
            - {{name: webhook, containerPort: {WEBHOOK_PORT}, protocol: TCP}}
            - {{name: admin, containerPort: {ADMIN_PORT}, protocol: TCP}}
          readinessProbe:
            httpGet: {{path: /ready, port: {ADMIN_PORT}}}
            periodSeconds: 5
          livenessProbe:
            httpGet: {{path: /live, port: {ADMIN_PORT}}}
            periodSeconds: 10
          resources:
            requests: {{cpu: 50m, memory: 64Mi}}
            limits: {{memory: 512Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {{drop: [ALL]}}
          volumeMounts:
            - {{name: ca, mountPath: /var/run/remora/ca, readOnly: true}}
      volumes:
        - name: ca
          secret: {{secretName: {SECRET}}}
"#,
        image = q(&s.control_image),
        td = q(&s.trust_domain),
        cd = q(&s.cluster_domain),
        proxy = q(&s.proxy_image),
    ));
    let pdb_api = if s.kube_minor < 21 {
        "policy/v1beta1"
    } else {
        "policy/v1"
    };
    docs.push(format!(
        "apiVersion: {pdb_api}\nkind: PodDisruptionBudget\nmetadata:\n  name: {SERVICE}\n  namespace: {NAMESPACE}\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels: {{app.kubernetes.io/name: {SERVICE}}}\n"
    ));
    docs.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {SERVICE}\n  namespace: {NAMESPACE}\nspec:\n  selector: {{app.kubernetes.io/name: {SERVICE}}}\n  ports:\n    - {{name: grpc, port: {GRPC_PORT}, targetPort: {GRPC_PORT}, protocol: TCP, appProtocol: grpc}}\n    - {{name: webhook, port: 443, targetPort: {WEBHOOK_PORT}, protocol: TCP}}\n    - {{name: admin, port: {ADMIN_PORT}, targetPort: {ADMIN_PORT}, protocol: TCP}}\n"
    ));
    let client = match &s.webhook_url {
        Some(url) => format!("url: {}", q(url)),
        None => format!(
            "service: {{namespace: {NAMESPACE}, name: {SERVICE}, path: {}, port: 443}}",
            crate::webhook::PATH
        ),
    };
    docs.push(format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: {WEBHOOK}
webhooks:
  - name: inject.remora.io
    admissionReviewVersions: [v1]
    sideEffects: None
    # A control plane that is down never blocks pod creation (the pod starts unmeshed).
    failurePolicy: Ignore
    timeoutSeconds: 5
    reinvocationPolicy: Never
    namespaceSelector:
      matchLabels: {{remora.io/inject: enabled}}
    rules:
      - {{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods], scope: Namespaced}}
    clientConfig:
      {client}
      caBundle: {bundle}
"#,
        bundle = b64(&s.ca.ca_crt),
    ));
    docs.join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(minor: u32) -> Settings {
        Settings {
            ca: CaFiles {
                ca_crt: "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n".into(),
                issuer_crt: "issuer".into(),
                issuer_key: "key".into(),
            },
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            control_image: "remora:test".into(),
            proxy_image: "remora-proxy:test".into(),
            kube_minor: minor,
            webhook_url: None,
        }
    }

    fn docs(text: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn every_object_once_and_no_crd_and_no_root_key() {
        let out = manifests(&settings(35));
        let kinds: Vec<String> = docs(&out)
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Secret",
                "Deployment",
                "PodDisruptionBudget",
                "Service",
                "MutatingWebhookConfiguration"
            ]
        );
        assert!(!out.contains("CustomResourceDefinition"));
        assert!(!out.contains("root.key"));
        let d = docs(&out);
        assert_eq!(d[6]["apiVersion"], "policy/v1");
        assert_eq!(d[5]["spec"]["replicas"], 2);
        let args = &d[5]["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(
            !args
                .as_sequence()
                .unwrap()
                .contains(&"--inject-classic".into())
        );
    }

    #[test]
    fn old_clusters_get_their_apis_and_a_url_replaces_the_service() {
        let mut s = settings(20);
        s.webhook_url = Some("https://127.0.0.1:9443/inject".into());
        let d = docs(&manifests(&s));
        assert_eq!(d[6]["apiVersion"], "policy/v1beta1");
        let args = &d[5]["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(
            args.as_sequence()
                .unwrap()
                .contains(&"--inject-classic".into())
        );
        let cc = &d[8]["webhooks"][0]["clientConfig"];
        assert_eq!(cc["url"], "https://127.0.0.1:9443/inject");
        assert!(cc["service"].is_null());
    }
}
