//! Link-time layout of the shipped `remora-proxy` binary (release builds on x86_64 Linux with
//! glibc, where rustc links with its bundled LLD). Two things, both for resident memory:
//!
//! - The functions listed in `layout/remora-proxy.order` (what start-up and the request paths
//!   run, recorded by `layout/refresh.sh`) are laid out first and together. The kernel maps
//!   text in whole page-cache folios, so scattered code costs resident pages far beyond its
//!   size: idle RSS 7.7 → 4.5 MiB. Symbols the binary no longer has are skipped silently.
//! - Relative relocations are packed (`DT_RELR`, glibc ≥ 2.36): 317 KB of `.rela.dyn` that
//!   the loader reads at every start become 4 KB.
//!
//! Anything else (debug builds, other targets or linkers, an older glibc) links as before.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    let order = Path::new("layout/remora-proxy.order");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if !applies() {
        return;
    }
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = Path::new(&dir).join(order);
    if order.is_file() {
        link_arg(&format!("--symbol-ordering-file={}", order.display()));
        // A stale entry (a renamed function) is expected between refreshes.
        link_arg("--no-warn-symbol-ordering");
    }
    if glibc_at_least(2, 36) {
        link_arg("-z");
        link_arg("pack-relative-relocs");
    }
}

/// Release, x86_64 Linux/glibc built on itself, with rustc's default linker (LLD since Rust
/// 1.90): the only setup where both options are known to be understood at link and run time.
fn applies() -> bool {
    let var = |k: &str| env::var(k).unwrap_or_default();
    var("PROFILE") == "release"
        && var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("HOST") == var("TARGET")
        && env::var_os("RUSTC_LINKER").is_none()
        && !var("CARGO_ENCODED_RUSTFLAGS").contains("link")
}

fn link_arg(arg: &str) {
    println!("cargo:rustc-link-arg-bin=remora-proxy=-Wl,{arg}");
}

/// The build machine's glibc, which is the one the binary runs on when HOST == TARGET (a
/// container image built elsewhere must have at least this glibc anyway).
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.split_whitespace().nth(1) else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}
