//! API tests: a real server over HTTP on loopback, a real SQLite store behind it.

mod auth;
mod bad_input;
mod codes;
mod schedules;
mod support;
mod tasks;
