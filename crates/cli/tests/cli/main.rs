//! Tests of the real `stevedore` binary, run as a separate process.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod dashboard;
mod fuzz;
mod hostile;
mod identity;
mod image;
mod lease_safety;
mod metrics;
mod multi_node;
mod network;
mod node_client;
mod postgres;
mod python_client;
mod registry;
mod remote;
mod retention;
mod schedules;
mod serve;
mod soak;
mod stacks;
mod support;
mod tasks;
