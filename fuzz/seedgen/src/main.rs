use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use remora_certs::SpiffeId;
use remora_certs::ca::{self, LoadedIssuer};
use rustls::pki_types::ServerName;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn hello(sni: Option<&str>, tls12: bool, alpn: bool) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12, &rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    if alpn {
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    cfg.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("ignored.example").to_string()).unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut buf = Vec::new();
    c.write_tls(&mut buf).unwrap();
    buf
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .flat_map(|c| c.unwrap().as_ref().to_vec().into_iter().chain([0xff, 0x01]))
        .collect::<Vec<u8>>()
        .strip_suffix(&[0xff, 0x01])
        .unwrap()
        .to_vec()
}

fn key_der(pem: &str) -> Vec<u8> {
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .secret_der()
        .to_vec()
}

fn main() {
    let out: PathBuf = std::env::args()
        .nth(1)
        .expect("usage: seedgen OUT_DIR")
        .into();

    // TLS ClientHellos.
    let hellos = [
        (
            "sni-tls13",
            hello(Some("web.default.sa.cluster.local"), false, true),
        ),
        ("sni-tls12", hello(Some("Example.COM"), true, false)),
        ("nosni", hello(None, false, true)),
    ];
    for (name, h) in &hellos {
        put(&out.join("client_hello"), name, &h[1..]);
        let mut d = vec![0u8];
        d.extend_from_slice(h);
        put(&out.join("detect"), &format!("tls-{name}"), &d);
        d[0] = 4 << 2 | 1; // 5-byte reads, then a stall
        put(&out.join("detect"), &format!("tls-{name}-chunked"), &d);
    }

    // Protocol detection.
    let detect: &[(&str, u8, &[u8])] = &[
        ("h1-get", 0, b"GET / HTTP/1.1\r\nHost: web:80\r\n\r\n"),
        (
            "h1-absolute",
            1 << 2,
            b"GET http://echo.test:80/x HTTP/1.0\n\n",
        ),
        (
            "h1-connect",
            1,
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        ),
        ("h1-lower", 2, b"get /healthz HTTP/1.1\r\n"),
        ("h1-partial", 1, b"POST /api/v1/items?x=1 HTT"),
        (
            "h2-preface",
            0,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        ),
        ("h2-partial", 1, b"PRI * HTTP/2.0\r\n"),
        ("redis", 0, b"*1\r\n$4\r\nPING\r\n"),
        ("mysql-ish", 0, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
        ("double-space", 3 << 2, b"GET  / HTTP/1.1\r\n"),
        ("http09", 0, b"GET /a\r\n"),
        ("empty-stall", 1, b""),
    ];
    for (name, ctl, bytes) in detect {
        let mut d = vec![*ctl];
        d.extend_from_slice(bytes);
        put(&out.join("detect"), name, &d);
    }

    // Authorities (the arbitrary String takes the bytes nearly as is).
    for (i, a) in [
        "web.shop.svc.cluster.local:8080",
        "Echo.Test:80",
        "[::1]:9000",
        "user@host:443",
        "10.0.0.1",
        "http://a:1/x",
        "localhost:",
    ]
    .iter()
    .enumerate()
    {
        put(&out.join("authority"), &format!("a{i}"), a.as_bytes());
    }

    // REMORA_DESTINATIONS, from README.md.
    for (i, d) in [
        "echo.test:80=10.0.0.5:4143,10.0.0.6:4143;users:81=10.0.1.7:4143",
        "echo.test:80=127.0.0.1:9001,127.0.0.1:9002*3",
        "echo.test:80=127.0.0.1:9001,10.0.0.2:4143#spiffe://cluster.local/ns/default/sa/echo*2",
        "echo.test:80=127.0.0.1:9001,10.0.0.2:4143#spiffe://cluster.local/ns/default/sa/echo+quic*2",
        "echo.test:80=10.0.0.2:4143#spiffe://cluster.local/ns/default/sa/echo+quic:5143",
        "[::1]:80=[::1]:9000",
        "spiffe://cluster.local/ns/default/sa/web",
    ]
    .iter()
    .enumerate()
    {
        put(&out.join("destinations"), &format!("d{i}"), d.as_bytes());
    }

    // The endpoints file, from control-plane/src/source/file.rs and README.md.
    put(
        &out.join("file_source"),
        "services.toml",
        br#"
[[service]]
name = "Web.Shop.svc.cluster.local:8080"
endpoints = [
  { addr = "10.0.0.7:8080", identity = "spiffe://cluster.local/ns/shop/sa/web" },
  { addr = "10.0.0.8:8080", weight = 2 },
]
[[service]]
name = "empty:80"
"#,
    );
    put(&out.join("file_source"), "comment.toml", b"# no services\n");
    put(
        &out.join("file_source"),
        "quic.toml",
        br#"
[[service]]
name = "web:80"
endpoints = [
  { addr = "10.0.0.7:4143", identity = "spiffe://cluster.local/ns/shop/sa/web", quic = 4143 },
  { addr = "10.0.0.8:4143", quic = 5143 },
]
"#,
    );
    put(
        &out.join("file_source"),
        "ipv6.toml",
        b"[[service]]\nname = \"[::1]:80\"\nendpoints = [{ addr = \"[::1]:9000\", weight = 10000 }]\n",
    );
    put(
        &out.join("file_source"),
        "bad.toml",
        b"[[service]]\nname = \"a:1\"\nendpoints = [{ addr = \"1.2.3.4:5\", weight = 0 }]\n",
    );

    // Certificates: what `remora ca init` and `remora cert issue` make.
    let tmp = std::env::temp_dir().join(format!("remora-seedgen-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    ca::init_dir(&tmp.join("ca"), "cluster.local").unwrap();
    ca::init_dir(&tmp.join("other"), "other.local").unwrap();
    let issuer = LoadedIssuer::from_dir(&tmp.join("ca")).unwrap();
    let foreign = LoadedIssuer::from_dir(&tmp.join("other")).unwrap();
    let id = SpiffeId::workload("cluster.local", "default", "web").unwrap();
    let day = Duration::from_secs(24 * 3600);
    let good = ca::issue_with_new_key(&issuer, &id, day).unwrap();
    let other = ca::issue_with_new_key(&issuer, &id, day).unwrap();
    let alien = ca::issue_with_new_key(&foreign, &id, day).unwrap();
    let cert_set = |mode: u8, chain: &[u8], key: &[u8], bundle: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(chain);
        v.extend_from_slice(&[0xff, 0x00]);
        v.extend_from_slice(key);
        v.extend_from_slice(&[0xff, 0x00]);
        v.extend_from_slice(bundle);
        v
    };
    let c = out.join("certs");
    let pem_set = |l: &ca::Leaf, b: &str| {
        cert_set(
            2,
            l.chain_pem.as_bytes(),
            l.key_pem.as_bytes(),
            b.as_bytes(),
        )
    };
    put(&c, "good-pem", &pem_set(&good, &good.bundle_pem));
    put(
        &c,
        "mismatched-key",
        &cert_set(
            2,
            good.chain_pem.as_bytes(),
            other.key_pem.as_bytes(),
            good.bundle_pem.as_bytes(),
        ),
    );
    put(&c, "untrusted", &pem_set(&alien, &good.bundle_pem));
    put(
        &c,
        "two-roots",
        &pem_set(&alien, &format!("{}{}", good.bundle_pem, alien.bundle_pem)),
    );
    put(
        &c,
        "good-fixed-time",
        &cert_set(
            0,
            good.chain_pem.as_bytes(),
            good.key_pem.as_bytes(),
            good.bundle_pem.as_bytes(),
        ),
    );
    put(
        &c,
        "good-der",
        &cert_set(
            3,
            &der_of(&good.chain_pem),
            &key_der(&good.key_pem),
            &der_of(&good.bundle_pem),
        ),
    );
    put(
        &c,
        "alien-der",
        &cert_set(
            3,
            &der_of(&alien.chain_pem),
            &key_der(&alien.key_pem),
            &der_of(&good.bundle_pem),
        ),
    );
    // A leaf without a SPIFFE ID.
    let k = KeyPair::generate().unwrap();
    let now = rcgen::date_time_ymd(2025, 1, 1);
    let noid = issuer
        .issue_window(
            None,
            "web.example",
            &k,
            now,
            rcgen::date_time_ymd(2035, 1, 1),
        )
        .unwrap();
    put(
        &c,
        "no-identity",
        &cert_set(
            2,
            noid.as_bytes(),
            k.serialize_pem().as_bytes(),
            good.bundle_pem.as_bytes(),
        ),
    );

    // CSRs, as proxies send them, with each key type rcgen signs.
    let s = out.join("csr");
    let (_, csr) = ca::new_key_and_csr(&id).unwrap();
    put(&s, "p256-pem", &[&[0u8][..], csr.as_bytes()].concat());
    put(&s, "p256-der", &[&[1u8][..], &csr_der(&csr)].concat());
    for (name, alg) in [
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::new(vec!["asks.for.more".to_string()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = p.serialize_request(&key).unwrap().pem().unwrap();
        put(
            &s,
            &format!("{name}-pem"),
            &[&[0u8][..], pem.as_bytes()].concat(),
        );
        put(
            &s,
            &format!("{name}-der"),
            &[&[1u8][..], &csr_der(&pem)].concat(),
        );
    }
    let _ = fs::remove_dir_all(&tmp);
}

fn csr_der(pem: &str) -> Vec<u8> {
    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}
