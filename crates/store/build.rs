//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds the
//! migration files at compile time, and on stable Rust it cannot tell cargo to watch them.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
