//! The sandbox ingress gateway: a Pingora reverse proxy that routes requests to sandboxes by
//! header, Host subdomain or path, checks per-sandbox credentials, and keeps a lock-free route
//! table fed by a provider.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod config;
pub mod conn;
pub mod drain;
pub mod error;
pub mod grpc;
pub mod h2meter;
pub mod keys;
pub mod lean;
pub mod limit;
pub mod metrics;
pub mod objects;
pub mod ports;
pub mod provider;
pub mod proxy;
pub mod proxy_protocol;
pub mod renew;
pub mod route;
pub mod server;
pub mod table;
pub mod tls;
pub mod upstream;
pub mod watch;
