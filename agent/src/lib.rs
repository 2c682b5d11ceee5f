//! uplinkd: spreads a site's LAN clients over its ISP uplinks.
//!
//! Data flows one way, and the modules follow it:
//! `discover` (netlink links and neighbours) → `model` (clients, uplinks, assignments) →
//! `plan` (pure: desired dataplane) → `dataplane` (read back, diff, apply). `daemon` runs
//! the loop; `config` validates input before anything else runs.

pub mod api;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod discover;
pub mod fuzzing;
pub mod health;
pub mod init;
pub mod listen;
pub mod lock;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod plan;
pub mod telemetry;
pub mod usage;
