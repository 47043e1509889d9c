//! Sources of sandbox objects that feed the route table.

pub mod file;
pub mod kubernetes;
pub mod resolve;
