//! The one rustls crypto provider every TLS configuration in remora is built with (ring), so
//! the proxy, the control plane and their tests never depend on a process-wide default
//! provider being installed.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
