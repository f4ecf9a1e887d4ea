//! The control plane's endpoints file: `remora_control_plane::source::file::parse` (what
//! `FileSource::load` and each poll apply after the UTF-8 and not-empty checks) on fuzzed
//! TOML text.
//!
//! Invariants:
//! - errors name the file and a line that exists (`eps.toml: line N: …`, 1 <= N <= lines + 1),
//!   or the file alone;
//! - a table it accepts has normalized `host:port` names, weights in 1..=MAX_WEIGHT, a QUIC
//!   port (never 0) only with an identity, and no address twice within a service.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use remora_control_plane::source::file::parse;
use remora_certs::{MAX_WEIGHT, normalize_authority};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.trim().is_empty() {
        return; // refused before parse
    }
    match parse(Path::new("eps.toml"), text) {
        Ok(table) => {
            for (name, eps) in &table {
                assert_eq!(normalize_authority(name).as_deref(), Some(name.as_str()));
                // The file source publishes endpoint sets (keyed by address, so a listed-twice
                // address is refused by the parser, never merged), never aliases.
                let set = eps.set().expect("a file service is an endpoint set");
                for (addr, e) in set.iter() {
                    assert_eq!(*addr, e.addr);
                    assert!((1..=MAX_WEIGHT).contains(&e.weight));
                    assert!(e.quic.is_none() || e.identity.is_some(), "{e:?}");
                    assert_ne!(e.quic, Some(0));
                }
            }
        }
        Err(e) => {
            let rest = e.strip_prefix("eps.toml: ").expect("errors name the file");
            if let Some(after) = rest.strip_prefix("line ") {
                let n: usize = after
                    .split(':')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("a line number");
                let lines = text.matches('\n').count() + 1;
                assert!((1..=lines).contains(&n), "line {n} of {lines}");
            }
        }
    }
});
