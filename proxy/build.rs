//! Link-time layout of the shipped `remora-proxy` binary, for resident memory. Release builds
//! for the machine they run on (HOST == TARGET, Linux):
//!
//! - The functions listed in `layout/remora-proxy.order` (what start-up and the request paths
//!   run, recorded by `layout/refresh.sh`) are laid out first and together, with LLD's
//!   `--symbol-ordering-file` (rustc's bundled LLD is the default linker on x86_64 Linux since
//!   Rust 1.90). The kernel maps text in whole page-cache folios, so scattered code costs
//!   resident pages far beyond its size: idle RSS 7.7 → 4.9 MiB. Symbols the binary no longer
//!   has are skipped silently.
//! - With `REMORA_BUILD_RELR=1` at build time, relative relocations are packed (`DT_RELR`):
//!   317 KB of `.rela.dyn` that the loader reads at every start become 4 KB; idle RSS 4.5 MiB.
//!   Opt-in because the binary then needs glibc ≥ 2.36 where it runs, which an image built on
//!   a newer distribution and run on an older one (Ubuntu 22.04, RHEL 9) does not have.
//!
//! Each option is first tried on an empty program linked by the same rustc with the same
//! arguments (and run, for DT_RELR); a linker that refuses it (GNU ld under a distribution's
//! rustc built without LLD, a `linker` set in `.cargo/config.toml`) means the option is left
//! out, never a failed build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=layout/remora-proxy.order");
    println!("cargo:rerun-if-env-changed=REMORA_BUILD_RELR");
    let var = |k: &str| env::var(k).unwrap_or_default();
    if var("PROFILE") != "release"
        || var("CARGO_CFG_TARGET_OS") != "linux"
        || var("HOST") != var("TARGET")
    {
        return;
    }
    let (Ok(manifest), Ok(out)) = (env::var("CARGO_MANIFEST_DIR"), env::var("OUT_DIR")) else {
        return;
    };
    let out = PathBuf::from(out);
    let order = Path::new(&manifest).join("layout/remora-proxy.order");
    if order.is_file() {
        let args = [
            format!("--symbol-ordering-file={}", order.display()),
            // A stale entry (a renamed function) is expected between refreshes.
            "--no-warn-symbol-ordering".to_string(),
        ];
        if links(&out, "order", &args, false) {
            args.iter().for_each(|a| link_arg(a));
        } else {
            println!(
                "cargo:warning=remora-proxy: the linker does not take --symbol-ordering-file (not LLD?); the binary works, with a larger idle RSS"
            );
        }
    }
    if var("REMORA_BUILD_RELR") == "1" {
        let args = ["-z".to_string(), "pack-relative-relocs".to_string()];
        if links(&out, "relr", &args, true) {
            args.iter().for_each(|a| link_arg(a));
        } else {
            println!(
                "cargo:warning=remora-proxy: REMORA_BUILD_RELR=1 ignored: linking or running a DT_RELR program failed here (needs glibc >= 2.36)"
            );
        }
    }
}

/// `-Xlinker ARG` rather than `-Wl,ARG`: a path with a comma stays one argument.
fn link_arg(arg: &str) {
    println!("cargo:rustc-link-arg-bin=remora-proxy=-Xlinker");
    println!("cargo:rustc-link-arg-bin=remora-proxy={arg}");
}

/// Whether rustc links an empty program with these linker arguments (and, with `run`, whether
/// it then starts).
fn links(out: &Path, name: &str, args: &[String], run: bool) -> bool {
    let src = out.join(format!("probe-{name}.rs"));
    let bin = out.join(format!("probe-{name}"));
    if std::fs::write(&src, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = Command::new(rustc);
    // Lints denied in RUSTFLAGS (missing_docs...) must not fail the empty program; files a
    // flag makes it write (coverage profiles) land in OUT_DIR.
    cmd.arg(&src)
        .arg("-o")
        .arg(&bin)
        .arg("--cap-lints=allow")
        .current_dir(out);
    // The same target and flags as the crate (a `-C linker=` in them included).
    if let Ok(flags) = env::var("CARGO_ENCODED_RUSTFLAGS") {
        cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    for a in args {
        cmd.arg("-C")
            .arg("link-arg=-Xlinker")
            .arg("-C")
            .arg(format!("link-arg={a}"));
    }
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        cmd.arg("-C").arg(format!("linker={linker}"));
    }
    let linked = cmd.output().is_ok_and(|o| o.status.success());
    linked
        && (!run
            || Command::new(&bin)
                .current_dir(out)
                .status()
                .is_ok_and(|s| s.success()))
}
