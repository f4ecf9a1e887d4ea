//! remora's control plane and operator CLI (`remora`).
//!
//! `remora control` serves two gRPC APIs ([`remora_api`]) over TLS: `Discovery.Watch`, which
//! streams the endpoints a [`source`] (a file, or Kubernetes EndpointSlices) puts in the
//! [`registry`], and `Identity.Certify`, which signs workload CSRs ([`issuer`]) once a token
//! proves the identity asked for. `remora demo` runs a local mesh on the embedded defaults.

mod base64;
pub mod check;
pub mod cli;
pub mod demo;
pub mod discovery;
pub mod inject;
pub mod install;
pub mod issuer;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod source;
pub mod tap;
pub mod tokenreview;
pub mod top;
pub mod webhook;

// Re-exported so tests and embedders build clients with the same version.
pub use kube;

/// Hands freed heap back to the OS. Parsing a large endpoints file or a burst of handshakes
/// leaves megabytes free inside glibc's arenas, which otherwise count as resident for good.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
