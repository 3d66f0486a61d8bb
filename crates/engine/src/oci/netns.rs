//! The direct OCI runtime's task network: network namespaces prepared ahead of time on a
//! bridge of stevedore's own, isolated by the same host firewall rules as the Docker path's
//! task network ([`crate::firewall`]): no host, no other task, no blocked range (link-local
//! among them by default) except allowed destinations, the host's DNS resolvers on port 53,
//! no IPv6.
//!
//! ```text
//! host                                     namespace <bridge>-<address in hex>
//!   <bridge>  gateway (the subnet's first address)
//!     └─ stv<address in hex> ══ veth ══ eth0  <address>, default route via the gateway
//!        (an isolated port: no frame            lo up, IPv6 off
//!         from it reaches another task's)
//! ```
//!
//! A namespace's life: prepared in the background → ready → taken for a task
//! ([`NetnsSource::take`]) → given back when the task's container is gone
//! ([`NetnsSource::give_back`]) → destroyed in the background → its connections forgotten →
//! its address free again. The reset is destruction: a namespace serves one task, so nothing
//! a task left in it (a listening socket, an address, a route, a process the runtime missed)
//! can meet the next one. Its veth is deleted first, which cuts the old namespace off at once
//! even while something still holds it; then its bind mount goes. The connection tracking
//! entries of its address go next (when the `conntrack` tool is installed), so that no
//! connection of one task is taken for another's; only then is the address handed out
//! again. Those of the addresses retired within [`FORGET_AFTER`] are forgotten together,
//! from one reading of the kernel's table, which grows with the host's connections, not the
//! tasks'; sooner when a task waits for an address. Addresses are handed out in turn round
//! the subnet, so an address comes back as late as the subnet allows.
//!
//! A process killed with `kill -9` leaves its namespaces and veths behind: the names carry
//! the bridge's name and the address (inside the pool's subnet), so the next start removes
//! them before anything else, as does [`NetnsPool::shutdown`] (or, as a last resort, dropping
//! the pool). Hence one pool per bridge on a host: a second one would remove the first's.

use std::collections::{HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{NetnsSource, TaskNetns};
use crate::error::EngineError;
use crate::firewall;
use crate::network::{EgressPolicy, Ipv4Net, NetworkInfo, check_bridge_name};

/// The bridge of the OCI runtime's task network unless the operator names another.
pub const DEFAULT_TASK_BRIDGE: &str = "stvoci0";

/// The subnet of the OCI runtime's task network unless the operator names another: a private
/// range that Docker's default address pools (172.17.0.0/16 to 172.31.0.0/16, 192.168.0.0/16)
/// never hand out.
pub const DEFAULT_TASK_SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 213, 0, 0), 16);

/// Where `ip netns` keeps the namespaces' bind mounts.
const NETNS_DIR: &str = "/run/netns";
/// What the host side of a task's veth is called before its address in hex.
const VETH_PREFIX: &str = "stv";
/// What the firewall errors call the missing capability.
const CAPABILITY: &str = "the task network";
/// How long the background worker waits after a namespace could not be prepared.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Where the kernel lists its connection tracking table, when it does.
const CONNTRACK_TABLE: &str = "/proc/net/nf_conntrack";
/// Connection tracking entries from and to an address, both.
const BOTH_WAYS: (bool, bool) = (true, true);
/// How long the addresses of destroyed namespaces wait to have their connection tracking
/// entries forgotten together (unless a task waits for an address, or [`FORGET_BATCH`]
/// wait).
const FORGET_AFTER: Duration = Duration::from_secs(1);
/// How many addresses waiting to be forgotten are forgotten at once without waiting longer.
const FORGET_BATCH: usize = 64;
/// How long a task waits for an address when every one is held, some by namespaces on their
/// way out.
const ADDRESS_WAIT: Duration = Duration::from_secs(10);
/// How many namespaces the background worker prepares or destroys at a time: deleting a veth
/// waits for the kernel (an RCU grace period, tens of milliseconds) more than it works, so a
/// few at once keep up with tens of tasks a second.
const PARALLEL_JOBS: usize = 4;

/// What a [`NetnsPool`] builds and how many namespaces it keeps ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsPoolSettings {
    /// The runner's managed network name (what a code's `bridge` network becomes): the only
    /// network the pool serves. Default `stevedore-tasks`.
    pub network: String,
    /// The host's bridge interface, e.g. [`DEFAULT_TASK_BRIDGE`]: at most
    /// [`crate::MAX_BRIDGE_NAME_LEN`] characters. It also names the namespaces and the
    /// firewall chains, so two pools on one host need two bridges.
    pub bridge: String,
    /// The subnet, e.g. [`DEFAULT_TASK_SUBNET`]: the bridge has its first address (the
    /// tasks' gateway), each namespace one of the others. It must not overlap a route of
    /// the host's (Docker's networks, the host's own), which the pool checks at start.
    pub subnet: Ipv4Net,
    /// How many namespaces the pool keeps ready, e.g. twice the runner's slots: a burst of
    /// that many task starts takes them without waiting.
    pub size: usize,
    /// What tasks reach beyond the network, as on the Docker path.
    pub policy: EgressPolicy,
}

/// A pool of task network namespaces, prepared ahead of time in the background.
///
/// Start it with [`NetnsPool::start`] (root: it creates the bridge, sets the host firewall and
/// creates namespaces); stop it with [`NetnsPool::shutdown`], which removes every namespace
/// and veth of the pool (the bridge and its firewall rules stay, as a Docker network does,
/// until [`NetnsPool::remove_bridge`]).
#[derive(Debug)]
pub struct NetnsPool {
    shared: Arc<Shared>,
    /// The background worker that prepares and destroys namespaces; `None` once shut down.
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// What the pool's handle and its worker share.
#[derive(Debug)]
struct Shared {
    settings: NetnsPoolSettings,
    /// The bridge's address, the tasks' default gateway.
    gateway: Ipv4Addr,
    /// The host's upstream DNS resolvers, reachable on port 53 from every namespace.
    nameservers: Vec<Ipv4Addr>,
    /// The policy the firewall holds the bridge to now.
    policy: Mutex<EgressPolicy>,
    /// The `ip` tool.
    ip: PathBuf,
    /// The `conntrack` tool, when installed.
    conntrack: Option<PathBuf>,
    state: Mutex<State>,
    /// Wakes the worker: a namespace taken (refill) or given back (destroy), or shutdown.
    wake: Notify,
    /// Wakes the takers waiting for an address: a namespace ready, an address freed.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    /// Namespaces ready for a task, the oldest first.
    ready: VecDeque<TaskNetns>,
    /// Namespaces given back, to be destroyed.
    retiring: VecDeque<TaskNetns>,
    /// How many namespaces the worker is preparing.
    preparing: usize,
    /// How many namespaces given back the worker is destroying.
    destroying: usize,
    /// The addresses of destroyed namespaces whose connection tracking entries are to be
    /// forgotten before they are handed out again, and since when the first has waited.
    forgetting: Vec<Ipv4Addr>,
    forgetting_since: Option<Instant>,
    /// How many addresses the worker is forgetting now.
    being_forgotten: usize,
    /// A task waits for an address: forget at once.
    forget_now: bool,
    /// The addresses of the namespaces tasks hold.
    taken: HashSet<Ipv4Addr>,
    addresses: AddressBook,
    /// Set by shutdown: nothing more is prepared or handed out.
    closing: bool,
}

/// The subnet's task addresses: which are in use (ready, taken, or not yet destroyed), and
/// where the next search starts.
#[derive(Debug)]
struct AddressBook {
    /// The first task address (the one after the gateway).
    first: u32,
    /// How many task addresses the subnet has (neither the network, the gateway nor the
    /// broadcast address).
    count: u32,
    /// The offset of the next address to try, from `first`.
    cursor: u32,
    in_use: HashSet<Ipv4Addr>,
}

/// The names one namespace's parts have, from its address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Names {
    /// The namespace's name for `ip netns`: `<bridge>-<address in hex>`.
    netns: String,
    /// The host end of its veth: `stv<address in hex>` (the kernel allows 15 characters).
    veth: String,
}

/// What the worker does next.
enum Job {
    Destroy(TaskNetns),
    Forget(Vec<Ipv4Addr>),
    Prepare(Ipv4Addr),
    Wait,
    Stop,
}

// === impl NetnsPoolSettings ===

impl Default for NetnsPoolSettings {
    fn default() -> Self {
        NetnsPoolSettings {
            network: "stevedore-tasks".to_owned(),
            bridge: DEFAULT_TASK_BRIDGE.to_owned(),
            subnet: DEFAULT_TASK_SUBNET,
            size: 8,
            policy: EgressPolicy {
                blocked: EgressPolicy::default_blocked(),
                allowed: Vec::new(),
            },
        }
    }
}

impl NetnsPoolSettings {
    /// The task network as a runtime describes it (what its `ensure_network` and
    /// `inspect_network` answer): named after [`NetnsPoolSettings::network`], its id the
    /// bridge's name, no traffic between tasks, no IPv6.
    pub fn network_info(&self) -> NetworkInfo {
        let subnet = self.subnet.trunc();
        NetworkInfo {
            id: self.bridge.clone(),
            name: self.network.clone(),
            bridge: Some(self.bridge.clone()),
            subnets: vec![subnet],
            gateways: vec![AddressBook::gateway(subnet)],
            inter_container: false,
            ipv6: false,
        }
    }

    /// Checks what the kernel and the pool need: a bridge name the kernel and the firewall
    /// chains take, a subnet with room for the gateway and the pool.
    pub fn validate(&self) -> Result<(), EngineError> {
        check_bridge_name(&self.bridge)?;
        let book = AddressBook::new(self.subnet);
        if self.subnet.prefix_len() > 29 || book.count == 0 {
            return Err(EngineError::invalid_spec(format!(
                "the task subnet {} is too small: a /29 or larger holds the gateway and the \
                 tasks",
                self.subnet
            )));
        }
        if self.size > book.count as usize {
            return Err(EngineError::invalid_spec(format!(
                "the task subnet {} holds {} task addresses, fewer than the pool's {}",
                self.subnet, book.count, self.size
            )));
        }
        Ok(())
    }
}

// === impl NetnsPool ===

impl NetnsPool {
    /// Sets the task network up on this host and starts preparing namespaces: removes what a
    /// killed process of the same pool left, makes sure the bridge exists with the gateway's
    /// address, turns IP forwarding on, isolates the bridge (the firewall's rules for it,
    /// rebuilt whole) and masquerades the subnet. Needs root, `ip` (iproute2) and
    /// `iptables`; `conntrack` is used when installed.
    pub async fn start(settings: NetnsPoolSettings) -> Result<Self, EngineError> {
        settings.validate()?;
        let started = Instant::now();
        let ip = firewall::find_program("ip").ok_or_else(|| {
            unenforceable("the ip tool is not installed (Debian: apt-get install iproute2)")
        })?;
        let conntrack = firewall::find_program("conntrack");
        if conntrack.is_none() {
            tracing::warn!(
                "conntrack is not installed (Debian: apt-get install conntrack): a task's \
                 connection tracking entries outlive its namespace until they time out"
            );
        }
        remove_leftovers(&ip, &settings).await;
        let subnet = settings.subnet.trunc();
        let gateway = AddressBook::gateway(subnet);
        check_routes(&ip, &settings.bridge, subnet).await?;
        ensure_bridge(&ip, &settings.bridge, gateway, subnet).await?;
        enable_forwarding().await?;
        let nameservers = firewall::upstream_resolvers().await;
        firewall::isolate_own_bridge(&settings.bridge, subnet, &settings.policy, &nameservers)
            .await?;
        if let Some(conntrack) = &conntrack {
            forget_connections(conntrack, &subnet.to_string(), BOTH_WAYS).await;
        }
        tracing::info!(
            bridge = %settings.bridge,
            %subnet,
            %gateway,
            size = settings.size,
            took_ms = started.elapsed().as_millis(),
            "task network namespace pool started"
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ready: VecDeque::with_capacity(settings.size),
                retiring: VecDeque::new(),
                preparing: 0,
                destroying: 0,
                forgetting: Vec::new(),
                forgetting_since: None,
                being_forgotten: 0,
                forget_now: false,
                taken: HashSet::new(),
                addresses: AddressBook::new(subnet),
                closing: false,
            }),
            policy: Mutex::new(settings.policy.clone()),
            settings,
            gateway,
            nameservers,
            ip,
            conntrack,
            wake: Notify::new(),
            changed: Notify::new(),
        });
        let worker = tokio::spawn(Arc::clone(&shared).work());
        Ok(NetnsPool {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// How many namespaces are ready now.
    pub fn ready(&self) -> usize {
        self.shared.state().ready.len()
    }

    /// What the pool was started with.
    pub fn settings(&self) -> &NetnsPoolSettings {
        &self.shared.settings
    }

    /// The policy the bridge is held to now: the settings' one, or the last
    /// [`NetnsPool::isolate`]'s.
    pub fn policy(&self) -> EgressPolicy {
        self.shared
            .policy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Holds every namespace of the pool, those tasks hold included, to `policy` from now on
    /// (what a runtime's `isolate_network` does): the bridge's chains rebuilt whole in one
    /// transaction, nothing per namespace.
    pub async fn isolate(&self, policy: &EgressPolicy) -> Result<(), EngineError> {
        let shared = &self.shared;
        firewall::isolate_own_bridge(
            &shared.settings.bridge,
            shared.settings.subnet.trunc(),
            policy,
            &shared.nameservers,
        )
        .await?;
        *shared.policy.lock().unwrap_or_else(PoisonError::into_inner) = policy.clone();
        Ok(())
    }

    /// The tasks' default gateway, the bridge's address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.shared.gateway
    }

    /// Stops preparing namespaces and removes every namespace and veth of the pool, those
    /// tasks still hold included (the runtime removes its containers first). Taking fails
    /// from then on.
    pub async fn shutdown(&self) {
        {
            // What is ready or given back goes with the rest below.
            let mut state = self.shared.state();
            state.closing = true;
            state.ready.clear();
            state.retiring.clear();
        }
        self.shared.wake.notify_one();
        self.shared.changed.notify_waiters();
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(worker) = worker
            && let Err(error) = worker.await
        {
            tracing::warn!(%error, "the task network worker ended badly");
        }
        remove_leftovers(&self.shared.ip, &self.shared.settings).await;
        if let Some(conntrack) = &self.shared.conntrack {
            let subnet = self.shared.settings.subnet.trunc().to_string();
            forget_connections(conntrack, &subnet, BOTH_WAYS).await;
        }
    }

    /// Removes the bridge `bridge` and its firewall rules from this host: for an operator
    /// who stops using the OCI runtime's task network, and for tests. The pool on it, if
    /// any, must have been shut down.
    pub async fn remove_bridge(bridge: &str) -> Result<(), EngineError> {
        check_bridge_name(bridge)?;
        if Path::new("/sys/class/net").join(bridge).exists() {
            let ip = firewall::find_program("ip").ok_or_else(|| {
                unenforceable("the ip tool is not installed (Debian: apt-get install iproute2)")
            })?;
            ip_batch(&ip, None, &format!("link del {bridge}\n"))
                .await
                .map_err(|message| EngineError::Failed { message })?;
        }
        firewall::remove_own_bridge(bridge).await;
        Ok(())
    }
}

#[async_trait]
impl NetnsSource for NetnsPool {
    async fn take(&self, network: &str) -> Result<TaskNetns, EngineError> {
        let shared = &self.shared;
        if network != shared.settings.network {
            return Err(EngineError::invalid_spec(format!(
                "the network {network:?} is not served by the OCI runtime (its task network is \
                 {:?}; or use none)",
                shared.settings.network
            )));
        }
        let deadline = tokio::time::Instant::now() + ADDRESS_WAIT;
        let address = loop {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = shared.state();
                if state.closing {
                    return Err(EngineError::Failed {
                        message: "the task network pool is shut down".to_owned(),
                    });
                }
                if let Some(netns) = state.ready.pop_front() {
                    state.taken.insert(netns.address);
                    drop(state);
                    shared.wake.notify_one();
                    return Ok(netns);
                }
                if let Some(address) = state.addresses.allocate() {
                    break address;
                }
                let forgetting = state.forgetting.len() + state.being_forgotten;
                if state.preparing + state.destroying + state.retiring.len() + forgetting == 0 {
                    return Err(exhausted(shared.settings.subnet));
                }
                if !state.forgetting.is_empty() {
                    state.forget_now = true;
                    shared.wake.notify_one();
                }
            }
            // Every address is held, some by namespaces on their way out or in: one of them
            // will do.
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(exhausted(shared.settings.subnet));
            }
        };
        // The pool ran dry (a burst larger than its size): this task waits for its own.
        shared.wake.notify_one();
        tracing::debug!(%address, "the task network pool is empty: preparing a namespace inline");
        match shared.prepare(address).await {
            Ok(netns) => {
                let closing = {
                    let mut state = shared.state();
                    state.taken.insert(address);
                    state.closing
                };
                if closing {
                    // Shut down meanwhile: the shutdown's clean-up may have missed it.
                    shared.destroy(address).await;
                    return Err(EngineError::Failed {
                        message: "the task network pool is shut down".to_owned(),
                    });
                }
                Ok(netns)
            }
            Err(error) => {
                shared.state().addresses.release(address);
                shared.changed.notify_waiters();
                Err(error)
            }
        }
    }

    async fn give_back(&self, netns: TaskNetns) {
        let shared = &self.shared;
        let expected = Names::of(&shared.settings.bridge, netns.address);
        {
            let mut state = shared.state();
            if netns.path != expected.path() || !state.taken.remove(&netns.address) {
                // Twice, or not the pool's: destroying it could take a namespace from the
                // task that holds it now.
                tracing::warn!(
                    path = %netns.path.display(),
                    address = %netns.address,
                    "a task network namespace was given back that the pool did not hand out"
                );
                return;
            }
            state.retiring.push_back(netns);
        }
        shared.wake.notify_one();
    }
}

impl Drop for NetnsPool {
    /// Without a [`NetnsPool::shutdown`]: stops the worker and removes the pool's namespaces
    /// and veths all the same, blocking, so that nothing of them outlives the process.
    fn drop(&mut self) {
        let worker = self
            .worker
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(worker) = worker else {
            return;
        };
        worker.abort();
        let batch = leftovers_batch(&self.shared.settings);
        if batch.is_empty() {
            return;
        }
        let removed = std::process::Command::new(&self.shared.ip)
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    std::io::Write::write_all(&mut stdin, batch.as_bytes())?;
                }
                child.wait()
            });
        if let Err(error) = removed {
            tracing::warn!(%error, "cannot remove the task network namespaces");
        }
    }
}

// === impl Shared ===

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The background worker: destroys what was given back and keeps `size` namespaces ready
    /// (or being prepared), up to [`PARALLEL_JOBS`] at a time, until shutdown; then it
    /// finishes what it started.
    async fn work(self: Arc<Self>) {
        let mut jobs = tokio::task::JoinSet::new();
        loop {
            while jobs.len() < PARALLEL_JOBS {
                match self.next_job() {
                    Job::Destroy(netns) => jobs.spawn(Arc::clone(&self).retire(netns)),
                    Job::Forget(addresses) => jobs.spawn(Arc::clone(&self).forget(addresses)),
                    Job::Prepare(address) => jobs.spawn(Arc::clone(&self).refill(address)),
                    Job::Wait => break,
                    Job::Stop if jobs.is_empty() => return,
                    Job::Stop => break,
                };
            }
            // When the addresses waiting to be forgotten are due (`next_job` decides).
            let forget_at = self
                .state()
                .forgetting_since
                .map(|since| tokio::time::Instant::from_std(since + FORGET_AFTER));
            tokio::select! {
                Some(ended) = jobs.join_next(), if !jobs.is_empty() => {
                    if let Err(error) = ended {
                        tracing::warn!(%error, "a task network job ended badly");
                    }
                }
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(forget_at.unwrap_or_else(tokio::time::Instant::now)),
                    if forget_at.is_some() => {}
            }
        }
    }

    /// What the worker does next: destroy first (it cuts tasks' namespaces off), forget the
    /// connections of destroyed ones when that is due (it frees addresses), then refill.
    fn next_job(&self) -> Job {
        let mut state = self.state();
        let forget_due = state.being_forgotten == 0
            && !state.forgetting.is_empty()
            && (state.forget_now
                || state.closing
                || state.forgetting.len() >= FORGET_BATCH
                || state
                    .forgetting_since
                    .is_some_and(|since| since.elapsed() >= FORGET_AFTER));
        if let Some(netns) = state.retiring.pop_front() {
            state.destroying += 1;
            Job::Destroy(netns)
        } else if forget_due {
            let addresses = std::mem::take(&mut state.forgetting);
            state.forgetting_since = None;
            state.forget_now = false;
            state.being_forgotten = addresses.len();
            Job::Forget(addresses)
        } else if state.closing {
            Job::Stop
        } else if state.ready.len() + state.preparing < self.settings.size {
            match state.addresses.allocate() {
                Some(address) => {
                    state.preparing += 1;
                    Job::Prepare(address)
                }
                None => Job::Wait,
            }
        } else {
            Job::Wait
        }
    }

    /// Destroys a namespace given back; once that is certain, its address waits for its
    /// connections to be forgotten (or is free at once, without the `conntrack` tool).
    async fn retire(self: Arc<Self>, netns: TaskNetns) {
        let freed = self.destroy(netns.address).await;
        {
            let mut state = self.state();
            state.destroying -= 1;
            if freed && self.conntrack.is_some() {
                state.forgetting.push(netns.address);
                state.forgetting_since.get_or_insert_with(Instant::now);
            } else if freed {
                state.addresses.release(netns.address);
            }
        }
        self.wake.notify_one();
        self.changed.notify_waiters();
    }

    /// Forgets the connection tracking entries of `addresses` (of destroyed namespaces) from
    /// one reading of the table, then frees them.
    async fn forget(self: Arc<Self>, addresses: Vec<Ipv4Addr>) {
        if let Some(conntrack) = &self.conntrack {
            forget_task_connections(conntrack, &addresses).await;
        }
        {
            let mut state = self.state();
            state.being_forgotten = 0;
            for address in addresses {
                state.addresses.release(address);
            }
        }
        self.wake.notify_one();
        self.changed.notify_waiters();
    }

    /// Prepares a namespace for the ready queue. After a failure the job keeps its place a
    /// while, so that a broken host is not hammered.
    async fn refill(self: Arc<Self>, address: Ipv4Addr) {
        match self.prepare(address).await {
            Ok(netns) => {
                let mut state = self.state();
                state.preparing -= 1;
                if state.closing {
                    state.retiring.push_back(netns);
                } else {
                    state.ready.push_back(netns);
                }
            }
            Err(error) => {
                tracing::warn!(%error, %address, "cannot prepare a task network namespace");
                tokio::time::sleep(RETRY_AFTER).await;
                let mut state = self.state();
                state.preparing -= 1;
                state.addresses.release(address);
            }
        }
        self.wake.notify_one();
        self.changed.notify_waiters();
    }

    /// Creates the namespace of `address`: the namespace, its veth on the bridge (an isolated
    /// port), IPv6 off inside, lo and eth0 up, the address and the default route. What was
    /// made is removed again when a step fails.
    async fn prepare(&self, address: Ipv4Addr) -> Result<TaskNetns, EngineError> {
        let started = Instant::now();
        let bridge = &self.settings.bridge;
        let names = Names::of(bridge, address);
        let (netns, veth) = (&names.netns, &names.veth);
        let host_side = format!(
            "netns add {netns}\n\
             link add {veth} type veth peer name eth0 netns {netns}\n\
             link set {veth} addrgenmode none\n\
             link set {veth} master {bridge}\n\
             link set {veth} type bridge_slave isolated on\n\
             link set {veth} up\n"
        );
        let inside = format!(
            "link set lo up\n\
             addr add {address}/{prefix} dev eth0\n\
             link set eth0 up\n\
             route add default via {gateway}\n",
            prefix = self.settings.subnet.prefix_len(),
            gateway = self.gateway,
        );
        let made = async {
            ip_batch(&self.ip, None, &host_side).await?;
            disable_ipv6_inside(names.path()).await?;
            ip_batch(&self.ip, Some(netns), &inside).await
        }
        .await;
        if let Err(message) = made {
            self.destroy(address).await;
            return Err(EngineError::Failed {
                message: format!("cannot prepare the task network namespace {netns}: {message}"),
            });
        }
        tracing::debug!(
            %address,
            took_us = started.elapsed().as_micros(),
            "task network namespace prepared"
        );
        Ok(TaskNetns {
            path: names.path(),
            address,
            gateway: self.gateway,
            nameservers: self.nameservers.clone(),
        })
    }

    /// Destroys the namespace of `address`: its veth first (which cuts it off at once), then
    /// its bind mount. True when the veth is gone.
    async fn destroy(&self, address: Ipv4Addr) -> bool {
        let names = Names::of(&self.settings.bridge, address);
        let batch = format!("link del {}\nnetns del {}\n", names.veth, names.netns);
        // `-force` goes on past a part that is not there (a half-prepared namespace).
        let _ = ip_batch(&self.ip, None, &format!("-force\n{batch}")).await;
        if Path::new("/sys/class/net").join(&names.veth).exists() {
            tracing::error!(
                veth = %names.veth,
                %address,
                "cannot remove a task's veth: its address is not handed out again"
            );
            return false;
        }
        true
    }
}

// === impl AddressBook ===

impl AddressBook {
    fn new(subnet: Ipv4Net) -> Self {
        let network = u32::from(subnet.network());
        let size = 1u64 << (32 - u32::from(subnet.prefix_len()));
        AddressBook {
            first: network.saturating_add(2),
            count: u32::try_from(size.saturating_sub(3)).unwrap_or(0),
            cursor: 0,
            in_use: HashSet::new(),
        }
    }

    /// The gateway of `subnet`: its first address.
    fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1))
    }

    /// The next free address after the last one handed out, round the subnet.
    fn allocate(&mut self) -> Option<Ipv4Addr> {
        for _ in 0..self.count {
            let address = Ipv4Addr::from(self.first + self.cursor);
            self.cursor = (self.cursor + 1) % self.count;
            if self.in_use.insert(address) {
                return Some(address);
            }
        }
        None
    }

    fn release(&mut self, address: Ipv4Addr) {
        self.in_use.remove(&address);
    }
}

// === impl Names ===

impl Names {
    fn of(bridge: &str, address: Ipv4Addr) -> Self {
        let hex = format!("{:08x}", u32::from(address));
        Names {
            netns: format!("{bridge}-{hex}"),
            veth: format!("{VETH_PREFIX}{hex}"),
        }
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }
}

/// The address in a name of the pool's parts (`<prefix><address in hex>`), when it has that
/// form and the address is in `subnet`.
fn address_in_name(name: &str, prefix: &str, subnet: Ipv4Net) -> Option<Ipv4Addr> {
    let hex = name.strip_prefix(prefix)?;
    if hex.len() != 8 {
        return None;
    }
    let address = Ipv4Addr::from(u32::from_str_radix(hex, 16).ok()?);
    subnet.contains(&address).then_some(address)
}

/// The `ip -batch` lines that remove the pool's namespaces and veths on this host: veths named
/// after an address of the subnet or attached to the bridge, namespaces named after the
/// bridge and an address of the subnet.
fn leftovers_batch(settings: &NetnsPoolSettings) -> String {
    let subnet = settings.subnet.trunc();
    let mut batch = String::new();
    let names = |directory: &str| -> Vec<String> {
        std::fs::read_dir(directory)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|entry| entry.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for link in names("/sys/class/net") {
        let on_bridge = std::fs::read_link(format!("/sys/class/net/{link}/master"))
            .ok()
            .is_some_and(|master| master.file_name() == Some(settings.bridge.as_ref()));
        if on_bridge || address_in_name(&link, VETH_PREFIX, subnet).is_some() {
            batch.push_str(&format!("link del {link}\n"));
        }
    }
    let netns_prefix = format!("{}-", settings.bridge);
    for netns in names(NETNS_DIR) {
        if address_in_name(&netns, &netns_prefix, subnet).is_some() {
            batch.push_str(&format!("netns del {netns}\n"));
        }
    }
    batch
}

/// Removes the pool's namespaces and veths that are on this host.
async fn remove_leftovers(ip: &Path, settings: &NetnsPoolSettings) {
    let batch = leftovers_batch(settings);
    if batch.is_empty() {
        return;
    }
    let count = batch.lines().count();
    match ip_batch(ip, None, &format!("-force\n{batch}")).await {
        Ok(()) => tracing::info!(
            bridge = %settings.bridge,
            count,
            "removed task network namespaces and veths a previous run left"
        ),
        Err(error) => tracing::warn!(%error, "cannot remove every task network leftover"),
    }
}

/// Runs `ip -batch -` (inside `netns` when given) with `batch` on its input. A first line
/// `-force` goes on past failing lines instead of stopping at the first.
async fn ip_batch(ip: &Path, netns: Option<&str>, batch: &str) -> Result<(), String> {
    let (force, batch) = match batch.strip_prefix("-force\n") {
        Some(rest) => (true, rest),
        None => (false, batch),
    };
    let mut command = tokio::process::Command::new(ip);
    if let Some(netns) = netns {
        command.args(["-n", netns]);
    }
    if force {
        command.arg("-force");
    }
    let mut child = command
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", ip.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(batch.as_bytes())
            .await
            .map_err(|error| format!("cannot write to {}: {error}", ip.display()))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|error| format!("{} failed: {error}", ip.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip -batch failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs `ip` with `args` and gives its output.
async fn ip_output(ip: &Path, args: &[&str]) -> Result<String, EngineError> {
    let output = tokio::process::Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| unenforceable(format!("cannot run {}: {error}", ip.display())))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(unenforceable(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Refuses a subnet that overlaps a route of the host's on another interface (a Docker
/// network, the host's own LAN): its addresses would be ambiguous.
async fn check_routes(ip: &Path, bridge: &str, subnet: Ipv4Net) -> Result<(), EngineError> {
    let routes = ip_output(ip, &["-4", "-o", "route", "show"]).await?;
    match overlapping_route(&routes, bridge, subnet) {
        Some(route) => Err(EngineError::invalid_spec(format!(
            "the task subnet {subnet} overlaps the host's route {route:?}: choose another subnet"
        ))),
        None => Ok(()),
    }
}

/// The first route of `ip -o route` output that overlaps `subnet` on another device than
/// `bridge`.
fn overlapping_route(routes: &str, bridge: &str, subnet: Ipv4Net) -> Option<String> {
    routes
        .lines()
        .find(|line| {
            let mut words = line.split_whitespace();
            let Some(Ok(destination)) = words.next().map(crate::network::parse_ipv4_net) else {
                return false;
            };
            let device = line
                .split_whitespace()
                .skip_while(|word| *word != "dev")
                .nth(1);
            device != Some(bridge)
                && (destination.contains(&subnet.network()) || subnet.contains(&destination))
        })
        .map(|line| line.trim().to_owned())
}

/// Makes sure `bridge` is a bridge, up, with `gateway` as its only IPv4 address and no IPv6.
async fn ensure_bridge(
    ip: &Path,
    bridge: &str,
    gateway: Ipv4Addr,
    subnet: Ipv4Net,
) -> Result<(), EngineError> {
    let interface = Path::new("/sys/class/net").join(bridge);
    let address = format!("{gateway}/{}", subnet.prefix_len());
    let batch = if interface.exists() {
        if !interface.join("bridge").exists() {
            return Err(unenforceable(format!(
                "the interface {bridge} exists and is not a bridge: choose another name"
            )));
        }
        let addresses = ip_output(ip, &["-4", "-o", "addr", "show", "dev", bridge]).await?;
        let current: Vec<&str> = addresses
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace().skip_while(|word| *word != "inet");
                words.nth(1)
            })
            .collect();
        if current == [address.as_str()] {
            format!("link set {bridge} up\n")
        } else if current.is_empty() {
            format!("addr add {address} dev {bridge}\nlink set {bridge} up\n")
        } else {
            // Another network's bridge (Docker's?), or this one's before a change of subnet:
            // readdressing it could cut off whatever is on it.
            return Err(unenforceable(format!(
                "the bridge {bridge} exists with the addresses {current:?}, not {address}: \
                 choose another bridge name, or remove it (ip link del {bridge}) if it is an \
                 old task bridge of stevedore's"
            )));
        }
    } else {
        format!(
            "link add {bridge} type bridge\naddr add {address} dev {bridge}\nlink set {bridge} up\n"
        )
    };
    ip_batch(ip, None, &batch).await.map_err(|message| {
        unenforceable(format!("cannot set the bridge {bridge} up: {message}"))
    })?;
    let ipv6 = Path::new("/proc/sys/net/ipv6/conf")
        .join(bridge)
        .join("disable_ipv6");
    if ipv6.exists() {
        tokio::fs::write(&ipv6, "1")
            .await
            .map_err(|error| unenforceable(format!("cannot turn IPv6 off on {bridge}: {error}")))?;
    }
    Ok(())
}

/// Turns IPv4 forwarding on, without which the tasks reach nothing beyond the host.
async fn enable_forwarding() -> Result<(), EngineError> {
    const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = tokio::fs::read_to_string(FORWARDING)
        .await
        .unwrap_or_default();
    if current.trim() == "1" {
        return Ok(());
    }
    tokio::fs::write(FORWARDING, "1")
        .await
        .map_err(|error| unenforceable(format!("cannot turn IP forwarding on: {error}")))?;
    tracing::info!("IPv4 forwarding turned on for the task network");
    Ok(())
}

/// Turns IPv6 off inside the namespace at `path`, from a thread of its own that joins it
/// (the setting is per namespace, read through `/proc/sys` from the namespace one is in; a
/// thread of tokio's pools must never change namespace).
async fn disable_ipv6_inside(path: PathBuf) -> Result<(), String> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stevedore-netns".to_owned())
        .spawn(move || {
            let result = (|| {
                let namespace = std::fs::File::open(&path)
                    .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
                use std::os::fd::AsFd;
                rustix::thread::move_into_link_name_space(
                    namespace.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|error| format!("cannot join {}: {error}", path.display()))?;
                let conf = Path::new("/proc/sys/net/ipv6/conf");
                if !conf.exists() {
                    return Ok(()); // IPv6 is off in this kernel altogether.
                }
                for scope in ["all", "default"] {
                    std::fs::write(conf.join(scope).join("disable_ipv6"), "1")
                        .map_err(|error| format!("cannot turn IPv6 off ({scope}): {error}"))?;
                }
                Ok(())
            })();
            let _ = answer.send(result);
        })
        .map_err(|error| format!("cannot start a thread: {error}"))?;
    answered
        .await
        .map_err(|_| "the namespace thread ended without an answer".to_owned())?
}

/// Deletes the connection tracking entries of tasks' `addresses` that ended, so that no
/// connection of one is taken for the next one's: the connections they made, and those made
/// to them (by the host: nothing else may). When the kernel lists its table
/// (`/proc/net/nf_conntrack`, read once for all), only the directions that have entries are
/// deleted, which most often is none: running `conntrack` costs milliseconds of CPU, reading
/// the table far less.
pub(crate) async fn forget_task_connections(conntrack: &Path, addresses: &[Ipv4Addr]) {
    let table = tokio::fs::read_to_string(CONNTRACK_TABLE).await.ok();
    let tracked = table.as_deref().map(TrackedAddresses::of);
    for address in addresses {
        let directions = match &tracked {
            Some(tracked) => tracked.directions(*address),
            None => BOTH_WAYS,
        };
        if directions != (false, false) {
            forget_connections(conntrack, &address.to_string(), directions).await;
        }
    }
}

/// The addresses the connection tracking `table` (`/proc/net/nf_conntrack`'s lines) has
/// entries from and to, in their original direction: one pass, however many addresses are
/// asked about ([`TrackedAddresses::directions`]).
struct TrackedAddresses<'a> {
    sources: HashSet<&'a str>,
    destinations: HashSet<&'a str>,
}

impl<'a> TrackedAddresses<'a> {
    fn of(table: &'a str) -> Self {
        let mut tracked = TrackedAddresses {
            sources: HashSet::new(),
            destinations: HashSet::new(),
        };
        for line in table.lines() {
            // The first src= and dst= of a line are the original direction's.
            let mut words = line.split_whitespace();
            if let Some(source) = words.find_map(|word| word.strip_prefix("src=")) {
                tracked.sources.insert(source);
            }
            if let Some(destination) = words.find_map(|word| word.strip_prefix("dst=")) {
                tracked.destinations.insert(destination);
            }
        }
        tracked
    }

    /// Whether the table has entries whose original direction comes from `address`, and
    /// entries whose original direction goes to it.
    fn directions(&self, address: Ipv4Addr) -> (bool, bool) {
        let address = address.to_string();
        (
            self.sources.contains(address.as_str()),
            self.destinations.contains(address.as_str()),
        )
    }
}

/// Deletes the connection tracking entries from (`directions.0`) and to (`directions.1`)
/// `addresses`, an address or a CIDR range.
async fn forget_connections(conntrack: &Path, addresses: &str, directions: (bool, bool)) {
    let forget = |direction: &'static str, wanted: bool| async move {
        if !wanted {
            return;
        }
        let deleted = tokio::process::Command::new(conntrack)
            .args(["-D", direction, addresses])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await;
        // It exits 1 when there was nothing to delete, the usual case.
        if let Err(error) = deleted {
            tracing::warn!(%error, "cannot run conntrack");
        }
    };
    tokio::join!(
        forget("--orig-src", directions.0),
        forget("--orig-dst", directions.1)
    );
}

fn exhausted(subnet: Ipv4Net) -> EngineError {
    EngineError::Failed {
        message: format!("the task subnet {subnet} has no free address left"),
    }
}

fn unenforceable(hint: impl Into<String>) -> EngineError {
    EngineError::LimitUnenforceable {
        capability: CAPABILITY.to_owned(),
        hint: hint.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Ipv4Net {
        crate::network::parse_ipv4_net(text).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn addresses_go_round_the_subnet_skipping_the_gateway_and_those_in_use() {
        let subnet = net("10.9.0.0/29");
        assert_eq!(AddressBook::gateway(subnet), Ipv4Addr::new(10, 9, 0, 1));
        let mut book = AddressBook::new(subnet);
        assert_eq!(book.count, 5);
        let first: Vec<_> = (0..5).filter_map(|_| book.allocate()).collect();
        assert_eq!(
            first,
            (2..=6)
                .map(|d| Ipv4Addr::new(10, 9, 0, d))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            book.allocate(),
            None,
            "the broadcast address is never handed out"
        );
        book.release(Ipv4Addr::new(10, 9, 0, 4));
        book.release(Ipv4Addr::new(10, 9, 0, 2));
        // The search goes on from where it stopped: .2 comes back after .4.
        assert_eq!(book.allocate(), Some(Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(book.allocate(), Some(Ipv4Addr::new(10, 9, 0, 4)));
    }

    #[test]
    fn names_carry_the_bridge_and_the_address_and_fit_the_kernel() {
        let names = Names::of("stvoci0", Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(names.netns, "stvoci0-0ad50002");
        assert_eq!(names.veth, "stv0ad50002");
        assert!(names.veth.len() <= 15);
        assert_eq!(names.path(), Path::new("/run/netns/stvoci0-0ad50002"));
        let subnet = net("10.213.0.0/16");
        assert_eq!(
            address_in_name("stvoci0-0ad50002", "stvoci0-", subnet),
            Some(Ipv4Addr::new(10, 213, 0, 2))
        );
        // Another pool's bridge, another subnet's address, another name: not ours.
        assert_eq!(
            address_in_name("stvoci0-x-0ad50002", "stvoci0-", subnet),
            None
        );
        assert_eq!(address_in_name("stv0ae50002", VETH_PREFIX, subnet), None);
        assert_eq!(address_in_name("stvd-nettest", VETH_PREFIX, subnet), None);
    }

    #[test]
    fn the_conntrack_table_tells_which_directions_an_address_has() {
        let table = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.213.0.2 dst=203.0.113.7 sport=40000 dport=443 src=203.0.113.7 dst=192.0.2.2 sport=443 dport=40000 [ASSURED] mark=0 use=1\n\
                     ipv4     2 udp      17 29 src=192.0.2.2 dst=10.213.0.3 sport=5000 dport=53 [UNREPLIED] src=10.213.0.3 dst=192.0.2.2 sport=53 dport=5000 mark=0 use=1\n";
        let address = |last| Ipv4Addr::new(10, 213, 0, last);
        let tracked = TrackedAddresses::of(table);
        assert_eq!(tracked.directions(address(2)), (true, false));
        assert_eq!(tracked.directions(address(3)), (false, true));
        // 10.213.0.2 is a prefix of 10.213.0.20, never a match; nor is a reply's address.
        assert_eq!(tracked.directions(address(20)), (false, false));
        assert_eq!(
            tracked.directions(Ipv4Addr::new(203, 0, 113, 7)),
            (false, true)
        );
        assert_eq!(
            TrackedAddresses::of("").directions(address(2)),
            (false, false)
        );
    }

    #[test]
    fn a_subnet_on_another_interface_is_refused() {
        let routes = "default via 192.0.2.1 dev eth0\n\
                      10.0.0.0/8 via 192.0.2.1 dev eth0\n\
                      172.19.0.0/16 dev stevedore0 proto kernel scope link src 172.19.0.1\n\
                      10.213.0.0/16 dev stvoci0 proto kernel scope link src 10.213.0.1\n";
        let overlap = overlapping_route(routes, "stvoci0", net("10.213.0.0/16"));
        assert_eq!(
            overlap.as_deref(),
            Some("10.0.0.0/8 via 192.0.2.1 dev eth0")
        );
        let routes = "default via 192.0.2.1 dev eth0\n\
                      172.19.0.0/16 dev stevedore0 proto kernel scope link src 172.19.0.1\n\
                      10.213.0.0/16 dev stvoci0 proto kernel scope link src 10.213.0.1\n";
        assert_eq!(
            overlapping_route(routes, "stvoci0", net("10.213.0.0/16")),
            None
        );
        assert!(overlapping_route(routes, "stvoci0", net("172.19.4.0/24")).is_some());
    }

    #[test]
    fn settings_need_a_subnet_with_room_for_the_pool() {
        assert!(NetnsPoolSettings::default().validate().is_ok());
        let small = NetnsPoolSettings {
            subnet: net("10.9.0.0/30"),
            ..NetnsPoolSettings::default()
        };
        assert!(small.validate().is_err());
        let crowded = NetnsPoolSettings {
            subnet: net("10.9.0.0/29"),
            size: 6,
            ..NetnsPoolSettings::default()
        };
        assert!(crowded.validate().is_err());
        let long = NetnsPoolSettings {
            bridge: "a-bridge-name-too-long".to_owned(),
            ..NetnsPoolSettings::default()
        };
        assert!(long.validate().is_err());
    }
}
