//! remora's control plane and operator CLI (`remora`).
//!
//! For now: `remora demo`, a local mesh on the embedded defaults. The control-plane issue adds
//! endpoint discovery, certificate issuance and `remora control`.

pub mod cli;
pub mod demo;
