//! Whether the measured remora-proxy still has the functions `proxy/layout/remora-proxy.order`
//! lays out first. The order file names symbols with rustc's hashes; a compiler or dependency
//! update renames some, the link skips those silently, and idle RSS creeps back up. The report
//! states the share so a stale order file shows where the memory figures are read.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// Listed functions the binary has; how many one build should have (the file lists two builds'
/// names, see refresh.sh: its `# build NAME COUNT` lines); and how many of those found sit at
/// the front of its text (where the link puts them when it followed the order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Coverage {
    pub(crate) found: usize,
    pub(crate) expected: usize,
    pub(crate) in_front: usize,
}

impl Coverage {
    /// Below this share the layout has mostly decayed: refresh it.
    const FRESH: f64 = 0.9;

    /// One sentence for the report.
    pub(crate) fn describe(&self) -> String {
        let share = |n: usize| n as f64 / self.expected.max(1) as f64;
        let verdict = if share(self.in_front) >= Self::FRESH {
            "laid out together at the front of the text".to_string()
        } else if share(self.found) >= Self::FRESH {
            "but not laid out together: this binary was not linked with the order (see proxy/build.rs)"
                .to_string()
        } else {
            "stale: the others are scattered through the text and cost resident memory; \
             refresh with `bash proxy/layout/refresh.sh`"
                .to_string()
        };
        format!(
            "Text layout: {} of the {} functions `proxy/layout/remora-proxy.order` lists for one build are in the measured binary ({:.0} %), {} of them at the front of its text; {verdict}.",
            self.found,
            self.expected,
            share(self.found) * 100.0,
            self.in_front,
        )
    }
}

/// Counts the order file's symbols (one per line) that `nm -S`'s listing defines, and those
/// within the front of the text: from its first function, twice the listed functions' size.
pub(crate) fn coverage(order: &str, nm: &str) -> Coverage {
    // "ADDR SIZE t NAME", or "ADDR t NAME" without a size; "U NAME" is not defined here.
    let mut defined: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut text_start = u64::MAX;
    for line in nm.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (addr, size, kind, name) = match parts[..] {
            [a, z, k, n] => (a, Some(z), k, n),
            [a, k, n] => (a, None, k, n),
            _ => continue,
        };
        let (Ok(addr), size) = (
            u64::from_str_radix(addr, 16),
            size.and_then(|z| u64::from_str_radix(z, 16).ok())
                .unwrap_or(0),
        ) else {
            continue;
        };
        if matches!(kind, "t" | "T" | "w" | "W") {
            text_start = text_start.min(addr);
        }
        defined.insert(name, (addr, size));
    }
    // Comments are `#` lines, as LLD reads the file; `# build NAME COUNT` says how many names
    // one build should find.
    let lines = order.lines().map(str::trim).filter(|l| !l.is_empty());
    let (comments, listed): (Vec<&str>, Vec<&str>) = lines.partition(|l| l.starts_with('#'));
    let per_build = comments.iter().filter_map(|c| {
        match c
            .trim_start_matches('#')
            .split_whitespace()
            .collect::<Vec<_>>()[..]
        {
            ["build", _, n] => n.parse::<usize>().ok(),
            _ => None,
        }
    });
    let counts: Vec<usize> = per_build.collect();
    let found_n = listed.iter().filter(|s| defined.contains_key(*s)).count();
    // Which build this binary is: the one with the fewest names that still has at least as many
    // as were found (the other build's names are not in it), else the larger.
    let expected = counts
        .iter()
        .copied()
        .filter(|&c| c >= found_n)
        .min()
        .or_else(|| counts.iter().copied().max())
        .unwrap_or(listed.len());
    let found: Vec<(u64, u64)> = listed
        .iter()
        .filter_map(|s| defined.get(s).copied())
        .collect();
    let bytes: u64 = found.iter().map(|f| f.1).sum();
    let front_end = text_start.saturating_add(bytes.saturating_mul(2));
    Coverage {
        found: found.len(),
        expected,
        in_front: found.iter().filter(|f| f.0 < front_end).count(),
    }
}

/// The coverage for `bin`, or why it could not be read (no `nm`, no order file).
pub(crate) fn check(workspace: &Path, bin: &Path) -> Result<Coverage, String> {
    let path = workspace.join("proxy/layout/remora-proxy.order");
    let order = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let out = Command::new("nm")
        .arg("-S")
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

    // Two listed functions at the front of the text, one far behind, one undefined.
    const NM: &str = "\
0000000000001000 0000000000000100 t _ZN12remora_proxy4main17h74ffc46b0d16103aE
0000000000001100 0000000000000100 T _RNvCs1_5tokio3run
0000000000009000 0000000000000100 t _RNvCs1_4cold3far
0000000000000800 r SOME_RODATA
                 U malloc@GLIBC_2.2.5
";

    #[test]
    fn counts_listed_symbols_and_those_at_the_front() {
        let order = "_ZN12remora_proxy4main17h74ffc46b0d16103aE\n_RNvCs1_5tokio3run\n_RNvCs1_4cold3far\n_ZN5gone17h0000000000000000E\n\n";
        // Front: 0x1000 + 2 × 0x300 = 0x1600, which leaves out the far one.
        assert_eq!(
            coverage(order, NM),
            Coverage {
                found: 3,
                expected: 4,
                in_front: 2
            }
        );
    }

    #[test]
    fn the_builds_counts_set_what_one_build_should_find() {
        let order = "# remora-proxy's text layout\n# build package 3\n# build workspace 2\n_RNvCs1_5tokio3run\n_ZN5other17h0000000000000000E\n_ZN5third17h0000000000000000E\n_ZN5forth17h0000000000000000E\n";
        // One found: judged against the 2-name build, not the 3-name one.
        assert_eq!(
            coverage(order, NM),
            Coverage {
                found: 1,
                expected: 2,
                in_front: 1
            }
        );
        // More found than either build lists: against the larger.
        let order = "# build package 1\n# build workspace 2\n_RNvCs1_5tokio3run\n_RNvCs1_4cold3far\n_ZN12remora_proxy4main17h74ffc46b0d16103aE\n";
        assert_eq!(coverage(order, NM).expected, 2);
    }

    #[test]
    fn an_undefined_symbol_does_not_count() {
        assert_eq!(
            coverage("malloc@GLIBC_2.2.5\n", NM),
            Coverage {
                found: 0,
                expected: 1,
                in_front: 0
            }
        );
    }

    #[test]
    fn the_report_says_when_to_refresh_or_relink() {
        let c = |found, in_front| Coverage {
            found,
            expected: 100,
            in_front,
        };
        let fresh = c(95, 95).describe();
        assert!(
            fresh.contains("95 of the 100") && fresh.contains("laid out together"),
            "{fresh}"
        );
        let unordered = c(95, 3).describe();
        assert!(unordered.contains("not laid out together"), "{unordered}");
        let stale = c(50, 50).describe();
        assert!(
            stale.contains("stale") && stale.contains("refresh.sh"),
            "{stale}"
        );
        // An empty order file is not a division by zero.
        let empty = Coverage {
            found: 0,
            expected: 0,
            in_front: 0,
        };
        assert!(empty.describe().contains("0 of the 0"));
    }
}
