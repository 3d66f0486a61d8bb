//! API tests: a real server over HTTP on loopback, a real SQLite store behind it.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod bad_input;
mod clusters;
mod codes;
mod compat;
mod credentials;
mod dashboard;
mod logs;
mod quotas;
mod runner;
mod schedules;
mod stacks;
mod support;
mod tasks;
mod usage;
