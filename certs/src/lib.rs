//! Identities and certificates shared by the proxy and the control plane.
//!
//! For now: the SPIFFE identity type. The identity issue adds trust anchors, issuers, CSRs and
//! validation here.

pub mod identity;

pub use identity::SpiffeId;
