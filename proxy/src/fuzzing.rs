#![allow(missing_docs)]
//! Internals the fuzz targets (`fuzz/`) drive directly. Only with the `fuzzing` feature; not
//! part of the API.

pub mod detect {
    pub use crate::listener::detect::*;
}
pub mod tls {
    pub use crate::tls::*;
}
pub mod scrub {
    pub use crate::scrub::*;
}
pub mod config {
    pub use crate::config::*;
}
pub use crate::http::forward::request_authority;
