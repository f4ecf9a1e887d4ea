//! Authorities (`host:port`), as apps write them in URLs and as the control plane names
//! services. The proxy and the control plane normalise with the same function, so a name a
//! proxy asks for compares equal to the name the control plane serves.

/// Lower-cases an authority and checks it is `host:port` with a numeric port. `None` when it is
/// not. Used for both destination names and request authorities so they compare equal.
pub fn normalize_authority(a: &str) -> Option<String> {
    let (host, port) = a.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    // Bracketed IPv6 hosts keep their brackets; anything with a stray ':' outside them is wrong.
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None;
    }
    Some(a.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_host_port() {
        assert_eq!(
            normalize_authority("Echo.Test:80").as_deref(),
            Some("echo.test:80")
        );
        assert_eq!(normalize_authority("[::1]:80").as_deref(), Some("[::1]:80"));
        for bad in ["echo.test", ":80", "echo.test:http", "::1:80", "e:99999"] {
            assert_eq!(normalize_authority(bad), None, "{bad}");
        }
    }
}
