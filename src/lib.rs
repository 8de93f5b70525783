//! divkey: per-card diversified admin keys from a master key that never leaves the HSM.
//!
//! Dependency direction: `api` → `service` → (`store`, `policy`, `hsm` → `diversify`);
//! `diversify` and `domain` depend on nothing else of divkey.

pub mod api;
pub mod audit;
pub mod ceremony;
pub mod challenge;
pub mod cli;
pub mod config;
pub mod diversify;
pub mod domain;
pub mod hsm;
pub mod kcv;
pub mod logging;
pub mod metrics;
pub mod periodic;
pub mod policy;
pub mod ratelimit;
pub mod selftest;
pub mod service;
pub mod store;
pub mod tls;
