//! The egress sidecar's decision logic. The DNS proxy, nftables programming and policy API
//! build on the evaluator in [`engine`].
#![forbid(unsafe_code)]

pub mod engine;
