//! Identities and certificates shared by the proxy and the control plane: SPIFFE IDs, trust
//! anchors and issuers (rcgen), workload leaves, and the validation every certificate set goes
//! through before anyone uses it.

pub mod ca;
pub mod identity;
pub mod validate;

pub use identity::SpiffeId;
pub use validate::{Credentials, Problem, ValidationError};
