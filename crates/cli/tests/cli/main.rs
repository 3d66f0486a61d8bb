//! Tests of the real `stevedore` binary, run as a separate process.

mod python_client;
mod serve;
mod support;
mod tasks;
