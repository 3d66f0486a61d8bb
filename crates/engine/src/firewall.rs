//! The host firewall that isolates a task network, for the Docker implementation: iptables
//! rules on the engine's host, in chains of stevedore's own, so that a task container reaches
//! neither the host, nor another task, nor a blocked range (except allowed destinations).
//!
//! Docker's own rules only see traffic the host forwards (its `DOCKER-USER` chain hangs off
//! `FORWARD`); a container's packets to the host's own addresses (the bridge's gateway, the
//! host's other interfaces) go through `INPUT` instead. So each bridge gets two chains:
//!
//! ```text
//! INPUT       -i <bridge> -j STEVEDORE-IN-<bridge>     (to the host itself)
//!   ESTABLISHED,RELATED → RETURN; allowed destinations → RETURN; everything else → REJECT
//! DOCKER-USER -i <bridge> -j STEVEDORE-FWD-<bridge>    (through the host; FORWARD without Docker's chain)
//!   ESTABLISHED,RELATED → RETURN; to the same bridge (another task) → REJECT;
//!   allowed destinations → RETURN; to a published port of the host (DNAT) → REJECT;
//!   blocked ranges → REJECT; the rest (the internet) → RETURN
//! ```
//!
//! Allowed destinations are matched on the connection's original destination (conntrack's
//! `ctorigdst`), so an allowed host port stays allowed when Docker's NAT rewrites it. REJECT
//! answers with "administratively prohibited", which a program sees at once as "no route to
//! host" instead of waiting for a timeout. The engine host's DNS resolvers (from
//! `/etc/resolv.conf`) stay reachable on port 53: Docker's embedded DNS forwards a
//! container's queries to them from the container's own network namespace.
//!
//! IPv6: the network is created without it (and Docker turns it off inside its containers),
//! and `ip6tables` rejects every IPv6 packet from the bridge, to the host and through it, so
//! a link-local address cannot become a way around the rules.
//!
//! The chains are rebuilt whole in one `iptables-restore --noflush` transaction (the chain
//! header flushes just that chain), so applying the rules again, after a restart or a change
//! of settings, never leaves a moment without them; the jumps are added once.
//!
//! A bridge of stevedore's own (the direct OCI runtime's task network, [`isolate_own_bridge`])
//! gets the same chains, with three differences: no one else's rules accept its traffic after
//! ours (Docker's `FORWARD` policy is `DROP`), so what passes is accepted rather than handed
//! on; the forward chain also filters the way back into the bridge (`-o <bridge>`: replies
//! pass, anything new is refused); and a `nat` chain masquerades the subnet on its way out,
//! as Docker does for its networks:
//!
//! ```text
//! INPUT       -i <bridge> -j STEVEDORE-IN-<bridge>          (as above)
//! DOCKER-USER -i <bridge> -j STEVEDORE-FWD-<bridge>         (as above, ACCEPT for RETURN)
//! DOCKER-USER -o <bridge> -j STEVEDORE-FWD-<bridge>         (replies only)
//! POSTROUTING             -j STEVEDORE-NAT-<bridge>         (-s <subnet> ! -o <bridge> → MASQUERADE)
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::error::EngineError;
use crate::network::{Destination, EgressPolicy, Ipv4Net, NetworkInfo};

/// What the firewall errors call the missing capability.
const CAPABILITY: &str = "task network isolation";
/// How long iptables may wait for the xtables lock (legacy backend), in seconds.
const LOCK_WAIT_SECS: &str = "10";
/// Where DNS resolvers are listed on the engine's host.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where systemd-resolved lists the upstream resolvers when `/etc/resolv.conf` names only
/// its local stub (127.0.0.53), which no task network reaches.
const RESOLVED_UPSTREAM_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// One address family's tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// Applies `policy` to `network`'s bridge on this host, replacing whatever rules stevedore
/// had there before.
pub(crate) async fn isolate(
    network: &NetworkInfo,
    policy: &EgressPolicy,
) -> Result<(), EngineError> {
    let bridge = network.bridge.as_deref().ok_or_else(|| {
        unenforceable(format!(
            "the network {} has no bridge interface of its own to filter",
            network.name
        ))
    })?;
    crate::network::check_bridge_name(bridge)?;
    if !Path::new("/sys/class/net").join(bridge).exists() {
        return Err(unenforceable(format!(
            "the bridge {bridge} of the network {} is not on this machine: the engine runs \
             elsewhere, or this process runs in a container without the host's network; run the \
             runner on the engine's host (host network, root)",
            network.name
        )));
    }
    let resolvers = upstream_resolvers().await;
    let v4 = ipv4_rules(bridge, policy, &resolvers, Pass::Return);
    let forward_from = forward_chain_v4().await;
    apply(
        Family::V4,
        &v4,
        &filter_hooks(bridge, forward_from, Pass::Return),
    )
    .await?;
    if Path::new("/proc/net/if_inet6").exists() {
        let hooks = filter_hooks(bridge, "FORWARD", Pass::Return);
        apply(Family::V6, &ipv6_rules(bridge), &hooks).await?;
    }
    tracing::info!(
        network = %network.name,
        bridge,
        blocked = policy.blocked.len(),
        allowed = ?policy.allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
        resolvers = ?resolvers,
        "task network isolated by the host firewall"
    );
    Ok(())
}

/// Applies `policy` to `bridge`, a bridge of stevedore's own on this host whose tasks are in
/// `subnet`, with `resolvers` reachable on port 53: the same chains as [`isolate`], what
/// passes accepted, replies let back in, and the subnet masqueraded on its way out.
pub(crate) async fn isolate_own_bridge(
    bridge: &str,
    subnet: Ipv4Net,
    policy: &EgressPolicy,
    resolvers: &[Ipv4Addr],
) -> Result<(), EngineError> {
    crate::network::check_bridge_name(bridge)?;
    let forward_from = forward_chain_v4().await;
    let v4 = ipv4_rules(bridge, policy, resolvers, Pass::Accept);
    apply(
        Family::V4,
        &v4,
        &filter_hooks(bridge, forward_from, Pass::Accept),
    )
    .await?;
    let nat = masquerade_rules(bridge, subnet);
    let nat_hook = Hook {
        table: "nat",
        from: "POSTROUTING",
        matches: Vec::new(),
        to: nat_chain(bridge),
    };
    apply(Family::V4, &nat, &[nat_hook]).await?;
    if Path::new("/proc/net/if_inet6").exists() {
        let hooks = filter_hooks(bridge, "FORWARD", Pass::Accept);
        apply(Family::V6, &ipv6_rules(bridge), &hooks).await?;
    }
    tracing::info!(
        bridge,
        %subnet,
        blocked = policy.blocked.len(),
        allowed = ?policy.allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
        resolvers = ?resolvers,
        "task bridge isolated by the host firewall"
    );
    Ok(())
}

/// Takes the chains of `bridge`, an own bridge that goes away, and the jumps to them off the
/// host firewall. Best effort: what is not there is not missed.
pub(crate) async fn remove_own_bridge(bridge: &str) {
    let mut v4 = filter_hooks(bridge, "FORWARD", Pass::Accept);
    v4.extend(filter_hooks(bridge, "DOCKER-USER", Pass::Accept));
    v4.push(Hook {
        table: "nat",
        from: "POSTROUTING",
        matches: Vec::new(),
        to: nat_chain(bridge),
    });
    let v6 = filter_hooks(bridge, "FORWARD", Pass::Accept);
    for (family, hooks) in [(Family::V4, v4), (Family::V6, v6)] {
        for hook in &hooks {
            let delete: Vec<&str> = ["-w", LOCK_WAIT_SECS, "-t", hook.table, "-D", hook.from]
                .into_iter()
                .chain(hook.matches.iter().map(String::as_str))
                .chain(["-j", hook.to.as_str()])
                .collect();
            while run(family, &delete).await.is_ok() {}
        }
        let mut chains: Vec<(&str, &str)> = hooks
            .iter()
            .map(|hook| (hook.table, hook.to.as_str()))
            .collect();
        chains.sort_unstable();
        chains.dedup();
        for (table, chain) in chains {
            for action in ["-F", "-X"] {
                let _ = run(family, &["-w", LOCK_WAIT_SECS, "-t", table, action, chain]).await;
            }
        }
    }
}

/// The DNS resolvers a task network is given and may reach: the engine host's own, from
/// `/etc/resolv.conf`, or systemd-resolved's upstream ones when that file names only the
/// local stub (as Docker does).
pub(crate) async fn upstream_resolvers() -> Vec<Ipv4Addr> {
    let resolvers = host_resolvers(
        &tokio::fs::read_to_string(RESOLV_CONF)
            .await
            .unwrap_or_default(),
    );
    if !resolvers.is_empty() {
        return resolvers;
    }
    host_resolvers(
        &tokio::fs::read_to_string(RESOLVED_UPSTREAM_CONF)
            .await
            .unwrap_or_default(),
    )
}

/// The chain forwarded traffic is filtered in: Docker's `DOCKER-USER`, which Docker keeps
/// first in `FORWARD` and never flushes, or `FORWARD` itself on a host without it.
async fn forward_chain_v4() -> &'static str {
    match run(
        Family::V4,
        &["-w", LOCK_WAIT_SECS, "-n", "-L", "DOCKER-USER"],
    )
    .await
    {
        Ok(()) => "DOCKER-USER",
        Err(_) => "FORWARD",
    }
}

/// The chain of `bridge`'s traffic to the host.
pub(crate) fn input_chain(bridge: &str) -> String {
    format!("STEVEDORE-IN-{bridge}")
}

/// The chain of `bridge`'s traffic through the host.
pub(crate) fn forward_chain(bridge: &str) -> String {
    format!("STEVEDORE-FWD-{bridge}")
}

/// The chain that masquerades an own bridge's subnet.
pub(crate) fn nat_chain(bridge: &str) -> String {
    format!("STEVEDORE-NAT-{bridge}")
}

/// What the forward chain does with a packet it lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Hands it on to the network owner's rules (Docker's, which accept its bridges' traffic).
    Return,
    /// Accepts it: a bridge of stevedore's own, whose traffic no other rule accepts.
    Accept,
}

/// A jump from a built-in chain to one of ours: `-t <table> <from> <matches> -j <to>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hook {
    table: &'static str,
    from: &'static str,
    matches: Vec<String>,
    to: String,
}

/// The IPv4 rules, in `iptables-restore` form.
pub(crate) fn ipv4_rules(
    bridge: &str,
    policy: &EgressPolicy,
    resolvers: &[Ipv4Addr],
    pass: Pass,
) -> String {
    const REJECT: &str = "-j REJECT --reject-with icmp-admin-prohibited";
    let (input, forward) = (input_chain(bridge), forward_chain(bridge));
    let through = match pass {
        Pass::Return => "RETURN",
        Pass::Accept => "ACCEPT",
    };
    let mut allowed: Vec<Destination> = policy.allowed.clone();
    allowed.extend(resolvers.iter().map(|ip| Destination::address(*ip, 53)));
    allowed.sort();
    allowed.dedup();
    let allow_rules = |chain: &str, verdict: &str, rules: &mut Vec<String>| {
        for destination in &allowed {
            let net = destination.net;
            match destination.port {
                Some(port) => {
                    for protocol in ["tcp", "udp"] {
                        rules.push(format!(
                            "-A {chain} -p {protocol} -m conntrack --ctorigdst {net} \
                             --ctorigdstport {port} -j {verdict}"
                        ));
                    }
                }
                None => rules.push(format!(
                    "-A {chain} -m conntrack --ctorigdst {net} -j {verdict}"
                )),
            }
        }
    };
    let mut rules = vec![
        "*filter".to_owned(),
        format!(":{input} - [0:0]"),
        format!(":{forward} - [0:0]"),
        format!("-A {input} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"),
    ];
    allow_rules(&input, "RETURN", &mut rules);
    rules.push(format!("-A {input} {REJECT}"));
    rules.push(format!(
        "-A {forward} -m conntrack --ctstate RELATED,ESTABLISHED -j {through}"
    ));
    rules.push(format!("-A {forward} -o {bridge} {REJECT}"));
    allow_rules(&forward, through, &mut rules);
    rules.push(format!("-A {forward} -m conntrack --ctstate DNAT {REJECT}"));
    for net in &policy.blocked {
        rules.push(format!("-A {forward} -d {} {REJECT}", net.trunc()));
    }
    if pass == Pass::Accept {
        rules.push(format!("-A {forward} -j ACCEPT"));
    }
    rules.push("COMMIT".to_owned());
    rules.join("\n") + "\n"
}

/// The `nat` rules of an own bridge: its subnet masqueraded on the way out of it.
pub(crate) fn masquerade_rules(bridge: &str, subnet: Ipv4Net) -> String {
    let nat = nat_chain(bridge);
    [
        "*nat".to_owned(),
        format!(":{nat} - [0:0]"),
        format!("-A {nat} -s {} ! -o {bridge} -j MASQUERADE", subnet.trunc()),
        "COMMIT".to_owned(),
    ]
    .join("\n")
        + "\n"
}

/// The jumps to `bridge`'s filter chains: its traffic to the host from `INPUT`, its traffic
/// through the host from `forward_from`, and, for an own bridge, the traffic into it too.
fn filter_hooks(bridge: &str, forward_from: &'static str, pass: Pass) -> Vec<Hook> {
    let hook = |from: &'static str, direction: &str, to: String| Hook {
        table: "filter",
        from,
        matches: vec![direction.to_owned(), bridge.to_owned()],
        to,
    };
    let mut hooks = vec![
        hook("INPUT", "-i", input_chain(bridge)),
        hook(forward_from, "-i", forward_chain(bridge)),
    ];
    if pass == Pass::Accept {
        hooks.push(hook(forward_from, "-o", forward_chain(bridge)));
    }
    hooks
}

/// The IPv6 rules: nothing from the bridge, to the host or through it.
pub(crate) fn ipv6_rules(bridge: &str) -> String {
    const REJECT: &str = "-j REJECT --reject-with icmp6-adm-prohibited";
    let (input, forward) = (input_chain(bridge), forward_chain(bridge));
    [
        "*filter".to_owned(),
        format!(":{input} - [0:0]"),
        format!(":{forward} - [0:0]"),
        format!("-A {input} {REJECT}"),
        format!("-A {forward} {REJECT}"),
        "COMMIT".to_owned(),
    ]
    .join("\n")
        + "\n"
}

/// The IPv4 nameservers of a `resolv.conf`, loopback ones left out (Docker does not hand
/// those to containers on user-defined networks).
pub(crate) fn host_resolvers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|address| address.parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect()
}

/// Rebuilds the chains in `rules` and makes sure each of `hooks` jumps to them, first.
async fn apply(family: Family, rules: &str, hooks: &[Hook]) -> Result<(), EngineError> {
    run_restore(family, rules).await?;
    for hook in hooks {
        let jump: Vec<&str> = hook
            .matches
            .iter()
            .map(String::as_str)
            .chain(["-j", hook.to.as_str()])
            .collect();
        let check: Vec<&str> = ["-w", LOCK_WAIT_SECS, "-t", hook.table, "-C", hook.from]
            .into_iter()
            .chain(jump.iter().copied())
            .collect();
        if run(family, &check).await.is_ok() {
            continue;
        }
        let insert: Vec<&str> = ["-w", LOCK_WAIT_SECS, "-t", hook.table, "-I", hook.from, "1"]
            .into_iter()
            .chain(jump.iter().copied())
            .collect();
        run(family, &insert).await?;
    }
    Ok(())
}

async fn run_restore(family: Family, rules: &str) -> Result<(), EngineError> {
    let program = program(family, true)?;
    let mut child = tokio::process::Command::new(&program)
        .args(["-w", LOCK_WAIT_SECS, "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| unenforceable(format!("cannot run {}: {error}", program.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).await.map_err(|error| {
            unenforceable(format!("cannot write to {}: {error}", program.display()))
        })?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|error| unenforceable(format!("{} failed: {error}", program.display())))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(unenforceable(format!(
            "{} --noflush failed ({}): {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Runs `iptables` (or `ip6tables`) with `args`; `Ok` when it exits 0.
async fn run(family: Family, args: &[&str]) -> Result<(), EngineError> {
    let program = program(family, false)?;
    let output = tokio::process::Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| unenforceable(format!("cannot run {}: {error}", program.display())))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(unenforceable(format!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The path of `iptables`, `ip6tables` or their `-restore`.
fn program(family: Family, restore: bool) -> Result<PathBuf, EngineError> {
    let name = match (family, restore) {
        (Family::V4, false) => "iptables",
        (Family::V4, true) => "iptables-restore",
        (Family::V6, false) => "ip6tables",
        (Family::V6, true) => "ip6tables-restore",
    };
    find_program(name).ok_or_else(|| {
        unenforceable(format!(
            "{name} is not installed (Debian: apt-get install iptables)"
        ))
    })
}

/// The path of the system program `name`, from `PATH` or the usual sbin directories (which a
/// non-login `PATH` may lack).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|directory| directory.join(name))
        .find(|candidate| candidate.is_file())
}

fn unenforceable(hint: String) -> EngineError {
    EngineError::LimitUnenforceable {
        capability: CAPABILITY.to_owned(),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::parse_ipv4_net;

    fn net(text: &str) -> ipnet::Ipv4Net {
        parse_ipv4_net(text).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn the_rules_refuse_the_host_other_tasks_and_blocked_ranges_but_allowed_ones() {
        let policy = EgressPolicy {
            blocked: vec![net("10.0.0.0/8"), net("169.254.0.0/16")],
            allowed: vec![Destination {
                net: net("10.1.2.3"),
                port: Some(5432),
            }],
        };
        let rules = ipv4_rules(
            "stevedore0",
            &policy,
            &[Ipv4Addr::new(10, 255, 255, 53)],
            Pass::Return,
        );
        let lines: Vec<&str> = rules.lines().collect();
        let position = |needle: &str| {
            lines
                .iter()
                .position(|line| *line == needle)
                .unwrap_or_else(|| panic!("no line {needle:?} in\n{rules}"))
        };
        let reject = "-j REJECT --reject-with icmp-admin-prohibited";
        // To the host: only the allowed destinations and the resolver, then a refusal.
        let allowed_in = position(
            "-A STEVEDORE-IN-stevedore0 -p tcp -m conntrack --ctorigdst 10.1.2.3/32 --ctorigdstport 5432 -j RETURN",
        );
        let resolver_in = position(
            "-A STEVEDORE-IN-stevedore0 -p udp -m conntrack --ctorigdst 10.255.255.53/32 --ctorigdstport 53 -j RETURN",
        );
        let refuse_in = position(&format!("-A STEVEDORE-IN-stevedore0 {reject}"));
        assert!(allowed_in < refuse_in && resolver_in < refuse_in);
        // Through the host: other tasks first, then allowed, then published ports and ranges.
        let other_tasks = position(&format!(
            "-A STEVEDORE-FWD-stevedore0 -o stevedore0 {reject}"
        ));
        let allowed_fwd = position(
            "-A STEVEDORE-FWD-stevedore0 -p tcp -m conntrack --ctorigdst 10.1.2.3/32 --ctorigdstport 5432 -j RETURN",
        );
        let dnat = position(&format!(
            "-A STEVEDORE-FWD-stevedore0 -m conntrack --ctstate DNAT {reject}"
        ));
        let link_local = position(&format!(
            "-A STEVEDORE-FWD-stevedore0 -d 169.254.0.0/16 {reject}"
        ));
        assert!(other_tasks < allowed_fwd && allowed_fwd < dnat && dnat < link_local);
        assert_eq!(lines.first(), Some(&"*filter"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn an_own_bridge_accepts_what_passes_and_masquerades_its_subnet() {
        let policy = EgressPolicy {
            blocked: vec![net("10.0.0.0/8")],
            allowed: vec![Destination {
                net: net("10.1.2.3"),
                port: None,
            }],
        };
        let docker = ipv4_rules("stvoci0", &policy, &[], Pass::Return);
        assert!(!docker.contains("ACCEPT"), "{docker}");
        let own = ipv4_rules("stvoci0", &policy, &[], Pass::Accept);
        let lines: Vec<&str> = own.lines().collect();
        let reject = "-j REJECT --reject-with icmp-admin-prohibited";
        assert_eq!(
            lines[lines.len() - 5..],
            [
                "-A STEVEDORE-FWD-stvoci0 -m conntrack --ctorigdst 10.1.2.3/32 -j ACCEPT",
                &format!("-A STEVEDORE-FWD-stvoci0 -m conntrack --ctstate DNAT {reject}"),
                &format!("-A STEVEDORE-FWD-stvoci0 -d 10.0.0.0/8 {reject}"),
                "-A STEVEDORE-FWD-stvoci0 -j ACCEPT",
                "COMMIT",
            ]
        );
        // To the host nothing changes: the host's own INPUT rules still have their say.
        assert!(
            own.contains("-A STEVEDORE-IN-stvoci0 -m conntrack --ctorigdst 10.1.2.3/32 -j RETURN")
        );
        assert!(own.contains(&format!("-A STEVEDORE-IN-stvoci0 {reject}")));
        // Replies come back into the bridge; nothing new does.
        let hooks = filter_hooks("stvoci0", "DOCKER-USER", Pass::Accept);
        assert!(hooks.iter().any(|hook| hook.from == "DOCKER-USER"
            && hook.matches == ["-o", "stvoci0"]
            && hook.to == "STEVEDORE-FWD-stvoci0"));
        assert_eq!(
            filter_hooks("stvoci0", "DOCKER-USER", Pass::Return).len(),
            2
        );
        assert_eq!(
            masquerade_rules("stvoci0", net("10.47.0.0/16")),
            "*nat\n:STEVEDORE-NAT-stvoci0 - [0:0]\n\
             -A STEVEDORE-NAT-stvoci0 -s 10.47.0.0/16 ! -o stvoci0 -j MASQUERADE\nCOMMIT\n"
        );
    }

    #[test]
    fn ipv6_is_refused_whole() {
        let rules = ipv6_rules("stevedore0");
        assert!(rules.contains("-A STEVEDORE-IN-stevedore0 -j REJECT"));
        assert!(rules.contains("-A STEVEDORE-FWD-stevedore0 -j REJECT"));
    }

    #[test]
    fn resolvers_come_from_resolv_conf_without_loopback() {
        let conf = "# comment\nnameserver 10.255.255.53\nnameserver 127.0.0.53\nnameserver fd00::1\nsearch example\n";
        assert_eq!(host_resolvers(conf), vec![Ipv4Addr::new(10, 255, 255, 53)]);
    }
}
