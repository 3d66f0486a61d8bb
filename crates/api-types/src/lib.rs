//! The wire types of stevedore's HTTP APIs, shared by the server and the CLI:
//! IronWorker API v2 (`/2/...`), which the official IronWorker clients speak, and the runner
//! protocol (`/runner/v1/...`) that remote runners lease and report through.
//!
//! Requests are deliberately lenient where IronWorker's clients are (an optional field may be
//! absent or `null`; a payload may be a string or any JSON value); the server turns them into
//! validated domain values at the edge. Responses keep IronWorker's field names and shapes.
//! Timestamps are RFC 3339 strings in UTC.

#![forbid(unsafe_code)]

pub mod runner;
pub mod v2;
