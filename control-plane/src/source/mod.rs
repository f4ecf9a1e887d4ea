//! Where endpoints come from. Each source writes the [`crate::registry::Registry`].

pub mod file;
pub mod gateway;
pub mod kubernetes;
pub mod permission;
pub mod zones;
