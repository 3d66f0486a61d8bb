//! The network task containers run on, and what they may reach from it: [`NetworkSpec`] (what
//! a runner asks for), [`NetworkInfo`] (what the runtime has), and [`EgressPolicy`] (what
//! leaves the network: the ranges it never reaches, the destinations allowed all the same).
//!
//! The policy speaks IPv4 only: the task network is created without IPv6, and a runtime that
//! isolates it refuses every IPv6 packet from it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

pub use ipnet::Ipv4Net;

use crate::error::EngineError;

/// The label on networks a runner manages, with the network's purpose as its value.
pub const NETWORK_LABEL: &str = "stevedore.network";

/// The longest bridge interface name: the kernel's 15 characters, less one so that the
/// firewall chains named after it (`STEVEDORE-FWD-<bridge>`) fit iptables' 28.
pub const MAX_BRIDGE_NAME_LEN: usize = 14;

/// The ranges a task never reaches unless the operator says otherwise: private (RFC 1918),
/// shared carrier-grade NAT (RFC 6598, where some clouds serve metadata too), link-local
/// (RFC 3927, where clouds serve instance credentials at 169.254.169.254), loopback, "this
/// network", IETF protocol assignments, benchmarking, multicast and the reserved block.
/// The documentation ranges (TEST-NET-1/2/3) are not listed: they route nowhere real.
pub const DEFAULT_BLOCKED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The network a runner wants its task containers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// The network's name in the runtime, e.g. `stevedore-tasks`.
    pub name: String,
    /// The host's bridge interface for it, e.g. `stevedore0`: a fixed name that host
    /// firewall rules can match. At most [`MAX_BRIDGE_NAME_LEN`] characters.
    pub bridge: String,
    /// The subnet; `None` lets the runtime pick one that collides with nothing on the host.
    pub subnet: Option<Ipv4Net>,
}

/// A network as the runtime has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    /// The runtime's id of the network.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The host's bridge interface, when the network has one of its own.
    pub bridge: Option<String>,
    /// Its IPv4 subnets.
    pub subnets: Vec<Ipv4Net>,
    /// The host's addresses on it (the containers' default gateway).
    pub gateways: Vec<Ipv4Addr>,
    /// Whether containers on it may talk to each other directly.
    pub inter_container: bool,
    /// Whether it has IPv6.
    pub ipv6: bool,
}

/// What task containers on a network may reach beyond it. Traffic between two containers on
/// the network and traffic to the host itself are always refused (the host only where an
/// allowed destination names it); `blocked` ranges are refused unless an `allowed`
/// destination matches first; the rest (the internet) is reachable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    /// Ranges no task reaches, e.g. [`DEFAULT_BLOCKED_RANGES`].
    pub blocked: Vec<Ipv4Net>,
    /// Destinations reachable whatever else says no: the published API, a database the
    /// operator lets tasks use.
    pub allowed: Vec<Destination>,
}

/// An allowed destination: addresses, and optionally one port (TCP and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    /// The addresses (`/32` for one).
    pub net: Ipv4Net,
    /// The port, or every port when `None`.
    pub port: Option<u16>,
}

// === impl NetworkSpec ===

impl NetworkSpec {
    /// Checks the names before the runtime is asked: a bridge name the kernel (and the
    /// firewall chains) accept, a network name Docker accepts.
    pub fn validate(&self) -> Result<(), EngineError> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && self
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        if !name_ok {
            return Err(EngineError::invalid_spec(format!(
                "the network name {:?} must start with a letter or digit and hold only letters, \
                 digits, '_', '.' and '-'",
                self.name
            )));
        }
        if ["bridge", "host", "none", "default"].contains(&self.name.as_str()) {
            return Err(EngineError::invalid_spec(format!(
                "the network name {:?} is the engine's own; choose another",
                self.name
            )));
        }
        check_bridge_name(&self.bridge)
    }
}

/// A bridge interface name the kernel accepts and that leaves room for the chain prefixes.
pub fn check_bridge_name(bridge: &str) -> Result<(), EngineError> {
    let ok = !bridge.is_empty()
        && bridge.len() <= MAX_BRIDGE_NAME_LEN
        && bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(EngineError::invalid_spec(format!(
            "the bridge name {bridge:?} must be 1 to {MAX_BRIDGE_NAME_LEN} letters, digits, '_' \
             or '-'"
        )))
    }
}

// === impl EgressPolicy ===

impl EgressPolicy {
    /// [`DEFAULT_BLOCKED_RANGES`], parsed.
    pub fn default_blocked() -> Vec<Ipv4Net> {
        DEFAULT_BLOCKED_RANGES
            .iter()
            .filter_map(|range| range.parse().ok())
            .collect()
    }
}

// === impl Destination ===

impl Destination {
    /// One address, one port.
    pub fn address(ip: Ipv4Addr, port: u16) -> Self {
        Destination {
            net: Ipv4Net::from(ip),
            port: Some(port),
        }
    }

    /// Whether `ip:port` is allowed by this destination.
    pub fn matches(&self, ip: IpAddr, port: u16) -> bool {
        match ip {
            IpAddr::V4(ip) => self.net.contains(&ip) && self.port.is_none_or(|p| p == port),
            IpAddr::V6(_) => false,
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    /// `ADDRESS[/PREFIX][:PORT]`: `10.1.2.3`, `10.1.2.3:5432`, `10.1.0.0/16`,
    /// `10.1.0.0/16:443`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (net, port) = match text.rsplit_once(':') {
            Some((net, port)) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| format!("{text:?}: the port must be 1 to 65535"))?;
                (net, Some(port))
            }
            None => (text, None),
        };
        let net = parse_ipv4_net(net).map_err(|why| format!("{text:?}: {why}"))?;
        Ok(Destination { net, port })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.net),
            None => write!(f, "{}", self.net),
        }
    }
}

/// An IPv4 address (`/32`) or CIDR range, its host bits cleared.
pub fn parse_ipv4_net(text: &str) -> Result<Ipv4Net, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<Ipv4Net>()
            .map_err(|_| format!("{text:?} is not an IPv4 address or CIDR range"))?
    } else {
        text.parse::<Ipv4Addr>()
            .map(Ipv4Net::from)
            .map_err(|_| format!("{text:?} is not an IPv4 address or CIDR range"))?
    };
    Ok(net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_with_and_without_ports() {
        let parsed = |text: &str| text.parse::<Destination>();
        assert_eq!(
            parsed("10.1.2.3:5432").map(|d| d.to_string()),
            Ok("10.1.2.3/32:5432".to_owned())
        );
        assert_eq!(
            parsed("10.1.2.9/16").map(|d| d.to_string()),
            Ok("10.1.0.0/16".to_owned())
        );
        assert_eq!(
            parsed("10.1.0.0/16:443").map(|d| (d.port, d.net.prefix_len())),
            Ok((Some(443), 16))
        );
        for broken in [
            "",
            "10.1.2.3:0",
            "10.1.2.3:http",
            "fd00::1",
            "10.1.2/8",
            "x:80",
        ] {
            assert!(parsed(broken).is_err(), "{broken}");
        }
        let destination = parsed("192.0.2.0/24:80").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            destination.matches(
                "192.0.2.7"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                80
            )
        );
        assert!(!destination.matches(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 81));
    }

    #[test]
    fn the_default_blocked_ranges_all_parse_and_cover_metadata() {
        let blocked = EgressPolicy::default_blocked();
        assert_eq!(blocked.len(), DEFAULT_BLOCKED_RANGES.len());
        for address in [
            "169.254.169.254",
            "100.100.100.200",
            "10.0.0.1",
            "192.168.1.1",
        ] {
            let ip: Ipv4Addr = address.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
            assert!(blocked.iter().any(|net| net.contains(&ip)), "{address}");
        }
        let public = Ipv4Addr::new(203, 0, 113, 80);
        assert!(!blocked.iter().any(|net| net.contains(&public)));
    }

    #[test]
    fn names_are_checked() {
        let spec = |name: &str, bridge: &str| NetworkSpec {
            name: name.to_owned(),
            bridge: bridge.to_owned(),
            subnet: None,
        };
        assert!(spec("stevedore-tasks", "stevedore0").validate().is_ok());
        assert!(spec("bridge", "stevedore0").validate().is_err());
        assert!(spec("-x", "stevedore0").validate().is_err());
        assert!(spec("ok", "fifteen-chars-x").validate().is_err());
        assert!(spec("ok", "has space").validate().is_err());
    }
}
