//! Names and wire formats shared by the sandbox gateway, controller and egress sidecar.
//!
//! Everything here is part of the compatibility contract with the reference system, so every
//! header, annotation and resource name is defined exactly once.
#![forbid(unsafe_code)]

pub mod cli;
pub mod egress;
pub mod endpoints;
pub mod names;
pub mod net;
pub mod policy;
pub mod renew;
pub mod signing;
pub mod time;
