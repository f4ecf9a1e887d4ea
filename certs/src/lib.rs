//! What the proxy and the control plane share, so that neither depends on the other:
//! identities and certificates (SPIFFE IDs, trust anchors and issuers (rcgen), workload
//! leaves, and the validation every certificate set goes through before anyone uses it), the
//! endpoint model (authorities, endpoints and their weights, the traffic policy of a service),
//! the crypto provider, and the
//! client-side TLS that checks a peer's or the control plane's SPIFFE identity.

pub mod authority;
pub mod ca;
pub mod crypto;
pub mod endpoint;
pub mod identity;
pub mod policy;
pub mod tls;
pub mod validate;

pub use authority::normalize_authority;
pub use endpoint::{EndpointSpec, Locality, MAX_WEIGHT, is_zone_name};
pub use identity::SpiffeId;
pub use policy::{Match, Policy, RetryOn, Route, Split};
pub use validate::{Credentials, Problem, ValidationError};
