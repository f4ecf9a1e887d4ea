//! The `REMORA_DESTINATIONS` parser: `<StaticDestination as FromStr>` (proxy/src/config.rs)
//! on each `;`-separated entry, as clap applies it (`remora_proxy::cli::Args` with
//! `--destination=SPEC`, `value_delimiter = ';'`), then `Args::config` and `Config::validate`;
//! and `remora_certs::SpiffeId` parsing, which endpoint identities go through.
//!
//! Invariants:
//! - a parsed destination has a normalized `host:port` name and at least one endpoint, each
//!   with a weight in 1..=MAX_WEIGHT, and a QUIC port (never 0) only with an identity;
//! - it round-trips: written back as `NAME=ADDR[#ID[+quic:PORT]][*W],…` it parses to the same
//!   value;
//! - clap accepts the spec exactly when every `;`-separated entry parses, with the same values;
//! - a SPIFFE ID round-trips through `Display`, and its DNS name is non-empty ASCII.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use remora_certs::{MAX_WEIGHT, SpiffeId, normalize_authority};
// The binary's own flag parsing, compiled in here (the CLI is not part of the library).
#[allow(dead_code)]
#[path = "../../proxy/src/bin/remora-proxy/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "../../proxy/src/bin/remora-proxy/init.rs"]
mod init;
#[allow(dead_code)]
#[path = "../../proxy/src/bin/remora-proxy/job.rs"]
mod job;
use cli::Args;
use remora_proxy::StaticDestination;

fn write_back(d: &StaticDestination) -> String {
    let eps: Vec<String> = d
        .endpoints
        .iter()
        .map(|e| {
            let id = e
                .identity
                .as_ref()
                .map(|i| format!("#{i}"))
                .unwrap_or_default();
            let quic = e.quic.map(|q| format!("+quic:{q}")).unwrap_or_default();
            format!("{}{id}{quic}*{}", e.addr, e.weight)
        })
        .collect();
    format!("{}={}", d.name, eps.join(","))
}

fn check_id(id: &SpiffeId) {
    let again: SpiffeId = id
        .to_string()
        .parse()
        .expect("a SPIFFE ID's Display parses");
    assert_eq!(&again, id);
    let dns = id.dns_name();
    assert!(!dns.is_empty() && dns.is_ascii(), "{dns:?}");
    let _ = id.namespace_and_account();
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = spec.parse::<SpiffeId>() {
        check_id(&id);
    }

    let mut direct = Vec::new();
    let mut all_ok = true;
    for entry in spec.split(';') {
        match entry.parse::<StaticDestination>() {
            Ok(d) => {
                assert_eq!(
                    normalize_authority(&d.name).as_deref(),
                    Some(d.name.as_str())
                );
                assert!(!d.endpoints.is_empty());
                for e in &d.endpoints {
                    assert!((1..=MAX_WEIGHT).contains(&e.weight));
                    assert!(e.quic.is_none() || e.identity.is_some(), "{e:?}");
                    assert_ne!(e.quic, Some(0));
                    if let Some(id) = &e.identity {
                        check_id(id);
                    }
                }
                let text = write_back(&d);
                let again: StaticDestination = text
                    .parse()
                    .unwrap_or_else(|e| panic!("{text:?} (written back) does not parse: {e}"));
                assert_eq!(again, d, "{text:?}");
                direct.push(d);
            }
            Err(e) => {
                assert!(!e.is_empty());
                all_ok = false;
            }
        }
    }

    // Through clap, as the flag (the variable takes the same parser and delimiter).
    if spec.contains('\0') {
        return; // not a possible argument
    }
    let arg = format!("--destination={spec}");
    match Args::try_parse_from(["remora-proxy", arg.as_str()]) {
        Ok(args) => {
            assert!(
                all_ok,
                "clap accepted {spec:?}, which has an entry that does not parse"
            );
            assert_eq!(args.destinations, direct);
            if let Ok(cfg) = args.config() {
                let _ = cfg.validate();
            }
        }
        Err(e) => {
            assert!(
                !all_ok,
                "every entry of {spec:?} parses, clap refused it: {}",
                e.kind()
            );
        }
    }
});
