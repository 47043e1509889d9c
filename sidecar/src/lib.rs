//! The egress sidecar: a DNS proxy that answers only allowed names, nftables sets that admit
//! only allowed addresses, and an authenticated HTTP API to read and change the policy.
#![forbid(unsafe_code)]

pub mod accept;
pub mod always;
pub mod api;
pub mod config;
pub mod dns;
pub mod engine;
pub mod identity;
pub mod logskip;
pub mod metrics;
pub mod netlink;
pub mod nft;
pub mod privileges;
pub mod state;
pub mod webhook;
