//! The numeric bounds of the API, in one place so validation and documentation agree.

/// Priorities are 0 (default), 1 and 2 (highest), as in IronWorker.
pub const MAX_PRIORITY: u8 = 2;
/// IronWorker's default task timeout: one hour.
pub const DEFAULT_TIMEOUT_SECS: u32 = 3600;
/// The longest a single task may run: one day.
pub const MAX_TIMEOUT_SECS: u32 = 86_400;
/// The longest a task may be delayed: seven days.
pub const MAX_DELAY_SECS: u32 = 7 * 86_400;
/// Default memory limit of a task's container.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The smallest memory limit the Docker engine accepts is 6 MiB; stevedore asks for a bit more.
pub const MIN_MEMORY_MIB: u32 = 8;
/// The largest memory limit a code may ask for (64 GiB).
pub const MAX_MEMORY_MIB: u32 = 65_536;
/// The most CPUs a code may ask for.
pub const MAX_CPUS: f64 = 64.0;
/// Default payload size limit; the server's configuration may change it.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// The most user retries a code may ask for.
pub const MAX_RETRIES: u32 = 100;
/// The longest delay between user retries: one day.
pub const MAX_RETRIES_DELAY_SECS: u32 = 86_400;
/// IronWorker's default delay between retries.
pub const DEFAULT_RETRIES_DELAY_SECS: u32 = 60;
/// IronWorker's shortest `run_every`; the server may be configured lower for tests.
pub const DEFAULT_MIN_RUN_EVERY_SECS: u32 = 60;
/// The most tasks one request may queue.
pub const MAX_TASKS_PER_REQUEST: usize = 1000;
/// The most items one list page may hold.
pub const MAX_PER_PAGE: u32 = 100;
/// The default size of a list page, as in IronWorker.
pub const DEFAULT_PER_PAGE: u32 = 30;
/// The longest code, label and cluster names.
pub const MAX_NAME_LEN: usize = 255;
/// The longest cron expression: five fields fit in far less; a longer one is refused before it
/// is parsed or stored.
pub const MAX_CRON_LEN: usize = 256;
