//! The OCI runtime's task network against the real kernel: namespaces from the pool reach
//! neither each other, nor the host, nor link-local, nor a blocked range, but an allowed
//! destination and the rest of the world (masqueraded); a namespace given back comes back
//! fresh; the pool refills; what a killed process left is removed at start.
//!
//! The checks run from threads that join a namespace (`setns`), with std's sockets. Each test
//! has a bridge and subnet of its own, so the tests run side by side. They need root: without
//! it they skip, except in CI, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::net::{
    IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stevedore_engine::oci::{NetnsPool, NetnsPoolSettings, NetnsSource};
use stevedore_engine::{Destination, EgressPolicy, EngineError, Ipv4Net};

const NETWORK: &str = "stevedore-tasks";
const LINK_LOCAL: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether the test may run: as root. Outside CI a test without root skips, saying so.
fn root() -> bool {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(str::to_owned))
        });
    if euid.as_deref() == Some("0") {
        return true;
    }
    assert!(
        !in_ci(),
        "CI must run the task network tests as root (they create namespaces and firewall rules)"
    );
    eprintln!("skipped: the task network pool needs root; set CI=true to make this a failure");
    false
}

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

fn settings(
    bridge: &str,
    subnet: &str,
    size: usize,
    allowed: Vec<Destination>,
) -> NetnsPoolSettings {
    NetnsPoolSettings {
        network: NETWORK.to_owned(),
        bridge: bridge.to_owned(),
        subnet: net(subnet),
        size,
        policy: EgressPolicy {
            blocked: EgressPolicy::default_blocked(),
            allowed,
        },
    }
}

/// Runs `work` on a thread that has joined the network namespace at `path`.
fn in_netns<T: Send + 'static>(path: &Path, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let namespace = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&namespace),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        work()
    })
    .join()
    .unwrap()
}

/// Connects from inside the namespace at `path` to `to`.
fn connect_from(path: &Path, to: SocketAddrV4) -> std::io::Result<()> {
    in_netns(path, move || {
        TcpStream::connect_timeout(&SocketAddr::V4(to), CONNECT_TIMEOUT).map(drop)
    })
}

/// Asserts that the firewall refused the connection: "no route to host" (REJECT with
/// admin-prohibited), at once rather than after a timeout.
fn assert_refused_by_firewall(path: &Path, to: SocketAddrV4, what: &str) {
    let started = Instant::now();
    let result = connect_from(path, to);
    match result {
        Err(error) if error.kind() == ErrorKind::HostUnreachable => {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{what} ({to}): refused only after {:?}",
                started.elapsed()
            );
        }
        other => panic!("{what} ({to}) must be refused by the firewall, got {other:?}"),
    }
}

/// A listener inside the namespace at `path` on `port`, accepting in the background and
/// reporting each peer's address.
fn listen_in(path: &Path, port: u16) -> (TcpListener, mpsc::Receiver<SocketAddr>) {
    let listener = in_netns(path, move || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap()
    });
    let (peers, received) = mpsc::channel();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        while let Ok((stream, peer)) = accepting.accept() {
            drop(stream);
            if peers.send(peer).is_err() {
                return;
            }
        }
    });
    (listener, received)
}

/// This host's address on its way out, found without sending anything.
fn host_address() -> Ipv4Addr {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect("198.51.100.1:9").unwrap();
    match socket.local_addr().unwrap().ip() {
        IpAddr::V4(ip) if !ip.is_loopback() => ip,
        other => panic!("no IPv4 address of this host: {other}"),
    }
}

/// Whether `resolver` answers a DNS query (any answer, NXDOMAIN too) over UDP.
fn dns_answers(resolver: Ipv4Addr) -> bool {
    const QUERY: &[u8] = b"\x51\x7a\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
        \x07example\x03com\x00\x00\x01\x00\x01";
    // UDP: a query or its answer may be lost, so it is asked three times, as a stub resolver
    // would, each from a socket of its own.
    (0..3).any(|_| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        socket.send_to(QUERY, (resolver, 53)).unwrap();
        let mut answer = [0u8; 512];
        socket
            .recv_from(&mut answer)
            .is_ok_and(|(length, _)| length >= 2 && answer[..2] == QUERY[..2])
    })
}

/// The host firewall's rules about `bridge`, and the forwarding chains that lead to them: what
/// a failed reachability check prints.
fn firewall_of(bridge: &str) -> String {
    [vec!["-S"], vec!["-t", "nat", "-S"]]
        .iter()
        .map(|args| {
            let output = Command::new("iptables").args(args).output().unwrap();
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|line| {
                    line.contains(bridge)
                        || line.contains("FORWARD")
                        || line.contains("DOCKER-USER")
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the `conntrack` tool is here (required in CI, where the pool must use it).
fn conntrack_available() -> bool {
    let here = Command::new("conntrack").arg("--version").output().is_ok();
    assert!(
        here || !in_ci(),
        "CI must have conntrack (apt-get install conntrack)"
    );
    if !here {
        eprintln!("conntrack is not installed: the connection tracking checks are skipped");
    }
    here
}

/// How many connection tracking entries `address` has, either way.
fn tracked(address: Ipv4Addr) -> usize {
    ["--orig-src", "--orig-dst"]
        .iter()
        .map(|direction| {
            let output = Command::new("conntrack")
                .args(["-L", direction, &address.to_string()])
                .stderr(std::process::Stdio::null())
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).lines().count()
        })
        .sum()
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {}", args.join(" "));
}

/// Runs `ip` with `args` for what it removes, whether or not there was anything to remove.
fn quietly(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status();
}

fn ip_output(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A server outside the host, as far as the tasks can tell: a network namespace of its own
/// behind a veth, with a private address (`10.250.<n>.2`, in a blocked range) and a public
/// one (`203.0.113.<n>`, TEST-NET-3, not blocked), routed by the host. Removed when dropped.
struct OutsideServer {
    name: String,
    veth: String,
    private: Ipv4Addr,
    public: Ipv4Addr,
}

impl OutsideServer {
    fn start(n: u8) -> Self {
        let name = format!("stvnt-outside{n}");
        let veth = format!("stvnt-out{n}");
        quietly(&["netns", "del", &name]);
        quietly(&["link", "del", &veth]);
        let (host_side, private, public) = (
            format!("10.250.{n}.1"),
            Ipv4Addr::new(10, 250, n, 2),
            Ipv4Addr::new(203, 0, 113, n),
        );
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{host_side}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{private}/30"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{public}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", &host_side]);
        ip(&[
            "route",
            "add",
            &format!("{public}/32"),
            "via",
            &private.to_string(),
        ]);
        OutsideServer {
            name,
            veth,
            private,
            public,
        }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The host's address on the server's link: what a masqueraded task looks like to it.
    fn host_side(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.private.octets();
        Ipv4Addr::new(a, b, c, 1)
    }
}

impl Drop for OutsideServer {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "del", &format!("{}/32", self.public)])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Shuts the pool down and removes its bridge and firewall rules.
async fn tear_down(pool: NetnsPool) {
    let bridge = pool.settings().bridge.clone();
    pool.shutdown().await;
    drop(pool);
    NetnsPool::remove_bridge(&bridge).await.unwrap();
}

async fn wait_ready(pool: &NetnsPool, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.ready() < count {
        assert!(
            Instant::now() < deadline,
            "the pool did not prepare {count} namespaces in time ({} ready)",
            pool.ready()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_namespace_reaches_allowed_destinations_and_the_world_but_not_the_host_link_local_blocked_ranges_or_other_tasks()
 {
    if !root() {
        return;
    }
    let host = host_address();
    let outside = OutsideServer::start(41);
    // Listening is enough: the kernel completes a connection into the backlog unaccepted.
    let everywhere = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = everywhere.local_addr().unwrap().port();
    let allowed_on_host = TcpListener::bind((host, 0)).unwrap();
    let allowed_host_port = allowed_on_host.local_addr().unwrap().port();
    let (_allowed_listener, allowed_peers) = listen_in(&outside.path(), 7001);
    let (_other_listener, other_peers) = listen_in(&outside.path(), 7002);
    let allowed = vec![
        Destination::address(host, allowed_host_port),
        Destination::address(outside.private, 7001),
    ];
    let pool = NetnsPool::start(settings("stvnt-iso", "10.214.0.0/24", 2, allowed))
        .await
        .unwrap();
    let gateway = pool.gateway();
    assert_eq!(gateway, Ipv4Addr::new(10, 214, 0, 1));
    let first = pool.take(NETWORK).await.unwrap();
    let second = pool.take(NETWORK).await.unwrap();
    assert_ne!(first.address, second.address);
    assert_eq!(first.gateway, gateway);
    let at = |ip: Ipv4Addr, port: u16| SocketAddrV4::new(ip, port);

    // The host, on the bridge's address and on its own: refused, unless allowed.
    assert_refused_by_firewall(&first.path, at(gateway, host_port), "the gateway");
    assert_refused_by_firewall(&first.path, at(host, host_port), "the host's address");
    connect_from(&first.path, at(host, allowed_host_port))
        .unwrap_or_else(|error| panic!("the allowed host port must be reachable: {error}"));

    // Link-local (cloud metadata) and a blocked private range: refused, unless allowed.
    assert_refused_by_firewall(&first.path, at(LINK_LOCAL, 80), "link-local");
    assert_refused_by_firewall(&first.path, at(outside.private, 7002), "a blocked range");
    connect_from(&first.path, at(outside.private, 7001)).unwrap_or_else(|error| {
        panic!("the allowed private destination must be reachable: {error}")
    });
    let peer = allowed_peers.recv_timeout(CONNECT_TIMEOUT).unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(outside.host_side()), "masqueraded");

    // The world: an address outside the blocked ranges, reached through the host's NAT.
    connect_from(&first.path, at(outside.public, 7002))
        .unwrap_or_else(|error| panic!("a public address must be reachable: {error}"));
    let peer = other_peers.recv_timeout(CONNECT_TIMEOUT).unwrap();
    assert_eq!(
        peer.ip(),
        IpAddr::V4(outside.host_side()),
        "the task's address must not leave the host"
    );

    // Another task: not reachable from the first, though the host reaches it.
    let (_task_listener, _) = listen_in(&second.path, 7100);
    TcpStream::connect_timeout(&SocketAddr::V4(at(second.address, 7100)), CONNECT_TIMEOUT)
        .unwrap_or_else(|error| panic!("the host must reach a task's listener: {error}"));
    let between = connect_from(&first.path, at(second.address, 7100));
    assert!(between.is_err(), "a task reached another task: {between:?}");

    // No IPv6 inside: turned off, no address at all.
    let ipv6_off = in_netns(&first.path, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
    });
    assert_eq!(ipv6_off.unwrap().trim(), "1");
    let name = first.path.file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(
        ip_output(&["-n", &name, "-6", "-o", "addr", "show"]).trim(),
        ""
    );

    // DNS: the host's resolvers are the task's, reachable on port 53 (only there when they
    // are in a blocked range); and where this machine reaches the internet at all, so does the
    // task.
    assert!(first.nameservers.iter().all(|ip| !ip.is_loopback()));
    for &resolver in &first.nameservers {
        // The machine's resolver is not ours: when it answers nobody, the host included, the
        // task's silence says nothing about the task's network. It also drops bursts of
        // queries (a whole CI run asks it at once, and a task's go out masqueraded from the
        // host's address): a task it did not answer asks again, a second later, as long as
        // the host is answered in between; only a silence that lasts is the firewall's.
        let task_answered = || in_netns(&first.path, move || dns_answers(resolver));
        let mut answered = task_answered();
        let mut host_answered = answered || dns_answers(resolver);
        for _ in 0..4 {
            if answered || !host_answered {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            answered = task_answered();
            host_answered = answered || dns_answers(resolver);
        }
        assert!(
            answered || !host_answered,
            "the resolver {resolver} answers the host but not the task, five times; the host \
             firewall then:\n{}",
            firewall_of("stvnt-iso")
        );
        if !host_answered {
            eprintln!("the resolver {resolver} answers nobody just now: its check is left out");
        }
        if EgressPolicy::default_blocked()
            .iter()
            .any(|range| range.contains(&resolver))
        {
            assert_refused_by_firewall(&first.path, at(resolver, 80), "the resolver off port 53");
        }
    }
    let internet = ("example.com", 80)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.find(SocketAddr::is_ipv4))
        .filter(|address| TcpStream::connect_timeout(address, CONNECT_TIMEOUT).is_ok());
    if let Some(address) = internet {
        let reached = in_netns(&first.path, move || {
            let resolved = ("example.com", 80)
                .to_socket_addrs()
                .map(|mut addresses| addresses.find(SocketAddr::is_ipv4));
            (
                resolved.is_ok_and(|found| found.is_some()),
                TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map(drop),
            )
        });
        assert!(reached.0, "the task cannot resolve names");
        reached
            .1
            .unwrap_or_else(|error| panic!("the task cannot reach {address}: {error}"));
    } else {
        eprintln!(
            "this machine reaches no internet: the world was checked with {}",
            outside.public
        );
    }

    // A new policy holds the namespaces already handed out: the host port allowed no more.
    let mut stricter = pool.policy();
    stricter
        .allowed
        .retain(|destination| destination.net.addr() != host);
    pool.isolate(&stricter).await.unwrap();
    assert_refused_by_firewall(
        &first.path,
        at(host, allowed_host_port),
        "a host port no longer allowed",
    );
    let info = pool.settings().network_info();
    assert_eq!(
        (info.name.as_str(), info.gateways.as_slice()),
        (NETWORK, &[gateway][..])
    );

    pool.give_back(first).await;
    pool.give_back(second).await;
    tear_down(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_given_back_comes_back_fresh() {
    if !root() {
        return;
    }
    // A datagram to an allowed host port leaves a connection tracking entry behind.
    let host = host_address();
    let receiver = UdpSocket::bind((host, 0)).unwrap();
    let udp_port = receiver.local_addr().unwrap().port();
    let allowed = vec![Destination::address(host, udp_port)];
    // Five task addresses, so the first one's comes round again soon.
    let pool = NetnsPool::start(settings("stvnt-reset", "10.214.1.0/29", 1, allowed))
        .await
        .unwrap();
    let used = pool.take(NETWORK).await.unwrap();
    let old_namespace = std::fs::metadata(&used.path).unwrap().ino();
    let (_old_listener, _) = listen_in(&used.path, 7200);
    let name = used.path.file_name().unwrap().to_str().unwrap().to_owned();
    ip(&["-n", &name, "addr", "add", "10.77.0.9/32", "dev", "eth0"]);
    let address = used.address;
    let conntrack = conntrack_available();
    if conntrack {
        in_netns(&used.path, move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.send_to(b"hello", (host, udp_port)).unwrap();
        });
        let mut buffer = [0u8; 16];
        receiver.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        receiver.recv_from(&mut buffer).unwrap();
        assert!(tracked(address) > 0, "the datagram left no conntrack entry");
    }
    pool.give_back(used.clone()).await;
    // Given back twice: the second is refused, and must not touch what the address becomes.
    pool.give_back(used).await;

    let mut rounds = 0;
    let again = loop {
        let netns = tokio::time::timeout(Duration::from_secs(10), pool.take(NETWORK))
            .await
            .unwrap()
            .unwrap();
        if netns.address == address {
            break netns;
        }
        pool.give_back(netns).await;
        rounds += 1;
        assert!(rounds < 20, "the address {address} never came back");
    };
    assert_ne!(
        std::fs::metadata(&again.path).unwrap().ino(),
        old_namespace,
        "the namespace must be a new one"
    );
    let addresses = ip_output(&["-n", &name, "-4", "-o", "addr", "show"]);
    assert!(!addresses.contains("10.77.0.9"), "{addresses}");
    if conntrack {
        assert_eq!(
            tracked(address),
            0,
            "the old task's connections outlived its namespace"
        );
    }
    let listening = connect_from(&again.path, SocketAddrV4::new(again.address, 7200));
    assert_eq!(
        listening.map_err(|error| error.kind()),
        Err(ErrorKind::ConnectionRefused),
        "the old listener must not be there"
    );
    pool.give_back(again).await;
    tear_down(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_with_other_addresses_is_refused_not_readdressed() {
    if !root() {
        return;
    }
    let bridge = "stvnt-other";
    quietly(&["link", "del", bridge]);
    ip(&["link", "add", bridge, "type", "bridge"]);
    ip(&["addr", "add", "10.214.4.1/24", "dev", bridge]);
    let refused = NetnsPool::start(settings(bridge, "10.214.5.0/24", 1, Vec::new())).await;
    assert!(
        matches!(&refused, Err(EngineError::LimitUnenforceable { hint, .. }) if hint.contains("10.214.4.1/24")),
        "{refused:?}"
    );
    let addresses = ip_output(&["-4", "-o", "addr", "show", "dev", bridge]);
    assert!(addresses.contains("10.214.4.1/24"), "{addresses}");
    ip(&["link", "del", bridge]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_refills_and_takes_at_once() {
    if !root() {
        return;
    }
    const SIZE: usize = 4;
    const ROUNDS: usize = 25;
    let pool = NetnsPool::start(settings("stvnt-fill", "10.214.2.0/24", SIZE, Vec::new()))
        .await
        .unwrap();
    let refused = pool.take("some-docker-network").await;
    assert!(
        matches!(refused, Err(EngineError::InvalidSpec { .. })),
        "{refused:?}"
    );

    wait_ready(&pool, SIZE).await;
    // A burst beyond the pool's size: the extra one is prepared inline.
    let mut burst = Vec::new();
    for _ in 0..=SIZE {
        burst.push(pool.take(NETWORK).await.unwrap());
    }
    for netns in burst {
        pool.give_back(netns).await;
    }
    wait_ready(&pool, SIZE).await;

    let mut warm = Vec::new();
    for _ in 0..ROUNDS {
        wait_ready(&pool, SIZE).await;
        let started = Instant::now();
        let netns = pool.take(NETWORK).await.unwrap();
        warm.push(started.elapsed());
        pool.give_back(netns).await;
    }
    // Sustained: tasks one after another as fast as the pool hands them out (taking prepares
    // inline when the pool runs dry), each given back at once.
    let started = Instant::now();
    for _ in 0..ROUNDS * 4 {
        let netns = pool.take(NETWORK).await.unwrap();
        pool.give_back(netns).await;
    }
    let sustained = (ROUNDS * 4) as f64 / started.elapsed().as_secs_f64();
    tear_down(pool).await;

    // Size 0: every take prepares its namespace, which times preparing one.
    let pool = NetnsPool::start(settings("stvnt-fill", "10.214.2.0/24", 0, Vec::new()))
        .await
        .unwrap();
    let mut cold = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let netns = pool.take(NETWORK).await.unwrap();
        cold.push(started.elapsed());
        pool.give_back(netns).await;
    }
    let (warm, cold) = (p50(warm), p50(cold));
    println!(
        "take from a warm pool: p50 {warm:?}; preparing a namespace: p50 {cold:?}; \
         sustained take + give back with {SIZE} ready: {sustained:.0}/s"
    );
    assert!(warm < Duration::from_millis(1), "a warm take took {warm:?}");
    tear_down(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_killed_run_are_removed_at_start_and_nothing_is_left_at_the_end() {
    if !root() {
        return;
    }
    // What a killed process leaves: a namespace with its veth, named after an address of the
    // subnet (10.214.3.5 is 0ad60305), and a bare namespace.
    let (netns, veth) = ("stvnt-left-0ad60305", "stv0ad60305");
    let bare = "stvnt-left-0ad60306";
    for name in [netns, bare] {
        quietly(&["netns", "del", name]);
        ip(&["netns", "add", name]);
    }
    quietly(&["link", "del", veth]);
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    // Another pool's namespace is not touched.
    let foreign = "stvnt-leftover-0ad60305";
    quietly(&["netns", "del", foreign]);
    ip(&["netns", "add", foreign]);

    let pool = NetnsPool::start(settings("stvnt-left", "10.214.3.0/24", 2, Vec::new()))
        .await
        .unwrap();
    let names = netns_names();
    assert!(
        !names.iter().any(|name| name == netns || name == bare),
        "{names:?}"
    );
    assert!(names.iter().any(|name| name == foreign), "{names:?}");
    assert!(!links().iter().any(|link| link == veth));
    wait_ready(&pool, 2).await;
    let held = pool.take(NETWORK).await.unwrap();
    assert!(held.path.exists());

    // Dropped without a shutdown: the namespaces go all the same, the one held too.
    drop(pool);
    let ours = |name: &String| name.starts_with("stvnt-left-");
    assert!(!netns_names().iter().any(ours), "{:?}", netns_names());

    let pool = NetnsPool::start(settings("stvnt-left", "10.214.3.0/24", 2, Vec::new()))
        .await
        .unwrap();
    wait_ready(&pool, 2).await;
    let _held = pool.take(NETWORK).await.unwrap();
    tear_down(pool).await;
    assert!(!netns_names().iter().any(ours), "{:?}", netns_names());
    assert!(
        !links()
            .iter()
            .any(|link| link.starts_with("stv0ad603") || link == "stvnt-left"),
        "{:?}",
        links()
    );
    ip(&["netns", "del", foreign]);
}
