//! Whether the measured remora-proxy still has the functions `proxy/layout/remora-proxy.order`
//! lays out first. The order file names symbols with rustc's hashes; a compiler or dependency
//! update renames some, the link skips those silently, and idle RSS creeps back up. The report
//! states the share so a stale order file shows where the memory figures are read.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

/// Listed functions the binary has, of those listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Coverage {
    pub(crate) found: usize,
    pub(crate) listed: usize,
}

impl Coverage {
    /// Below this share the layout has mostly decayed: refresh it.
    const FRESH: f64 = 0.9;

    /// One sentence for the report.
    pub(crate) fn describe(&self) -> String {
        let share = self.found as f64 / self.listed.max(1) as f64;
        let verdict = if share >= Self::FRESH {
            "laid out together".to_string()
        } else {
            "stale: the others are scattered through the text and cost resident memory; \
             refresh with `bash proxy/layout/refresh.sh`"
                .to_string()
        };
        format!(
            "Text layout: {} of {} functions in `proxy/layout/remora-proxy.order` are in the measured binary ({:.0} %), {verdict}.",
            self.found,
            self.listed,
            share * 100.0
        )
    }
}

/// Counts the order file's symbols (one per line) that `nm`'s listing defines.
pub(crate) fn coverage(order: &str, nm: &str) -> Coverage {
    let defined: HashSet<&str> = nm
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace().rev();
            let name = parts.next()?;
            // "ADDR t NAME": defined; "U NAME" (undefined) has no address.
            let kind = parts.next()?;
            parts.next()?;
            (kind != "U").then_some(name)
        })
        .collect();
    let listed: Vec<&str> = order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Coverage {
        found: listed.iter().filter(|s| defined.contains(*s)).count(),
        listed: listed.len(),
    }
}

/// The coverage for `bin`, or why it could not be read (no `nm`, no order file).
pub(crate) fn check(workspace: &Path, bin: &Path) -> Result<Coverage, String> {
    let path = workspace.join("proxy/layout/remora-proxy.order");
    let order = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let out = Command::new("nm")
        .arg(bin)
        .output()
        .map_err(|e| format!("nm (binutils) to read {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "nm {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(coverage(&order, &String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NM: &str = "\
0000000000001000 t _ZN12remora_proxy4main17h74ffc46b0d16103aE
0000000000002000 T main
                 U malloc@GLIBC_2.2.5
0000000000003000 t _RNvCs1_5tokio3run
";

    #[test]
    fn counts_listed_symbols_the_binary_defines() {
        let order = "_ZN12remora_proxy4main17h74ffc46b0d16103aE\n_RNvCs1_5tokio3run\n_ZN5gone17h0000000000000000E\n\n";
        assert_eq!(
            coverage(order, NM),
            Coverage {
                found: 2,
                listed: 3
            }
        );
    }

    #[test]
    fn an_undefined_symbol_does_not_count() {
        assert_eq!(
            coverage("malloc@GLIBC_2.2.5\n", NM),
            Coverage {
                found: 0,
                listed: 1
            }
        );
    }

    #[test]
    fn the_report_says_when_to_refresh() {
        let fresh = Coverage {
            found: 95,
            listed: 100,
        }
        .describe();
        assert!(
            fresh.contains("95 of 100") && fresh.contains("laid out together"),
            "{fresh}"
        );
        let stale = Coverage {
            found: 50,
            listed: 100,
        }
        .describe();
        assert!(
            stale.contains("stale") && stale.contains("refresh.sh"),
            "{stale}"
        );
        // An empty order file is not a division by zero.
        assert!(
            Coverage {
                found: 0,
                listed: 0
            }
            .describe()
            .contains("0 of 0")
        );
    }
}
