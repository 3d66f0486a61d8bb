//! The task network: which network a task's container joins, and setting it up at start-up.
//!
//! A code's `network` is `bridge` (IronWorker's name, and the default), `none`, or a network
//! the operator lists. `bridge` runs on the network this runner manages
//! ([`TaskNetworkConfig::spec`]), never on Docker's default bridge: at start-up the runner
//! makes sure it exists and has the engine isolate it (no traffic to the engine's host,
//! between tasks, or to a blocked range, except allowed destinations and the published API).
//! When that isolation cannot be had, the runner refuses to start unless the operator opted
//! for an unguarded network ([`TaskNetworkConfig::unguarded`]).

use std::net::IpAddr;

use stevedore_engine::{
    ContainerEngine, Destination, EgressPolicy, Ipv4Net, NetworkInfo, NetworkSpec,
};
use stevedore_model::code::{DEFAULT_NETWORK, NO_NETWORK};

use crate::error::RunnerError;

/// The network tasks run on and what they reach from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskNetworkConfig {
    /// The managed network: its name, bridge interface and subnet. Default
    /// `stevedore-tasks` on the bridge `stevedore0`, its subnet picked by the engine.
    pub spec: NetworkSpec,
    /// Ranges no task reaches. Default: private, carrier-grade NAT, link-local and the other
    /// special ranges of [`stevedore_engine::DEFAULT_BLOCKED_RANGES`].
    pub blocked: Vec<Ipv4Net>,
    /// Destinations tasks reach all the same (a host's port or a range). Default none.
    pub allowed: Vec<Destination>,
    /// The API as the operator publishes it to tasks, so workers can queue follow-up tasks:
    /// reachable from the task network, and handed to tasks as `IRON_HOST`, `IRON_PORT` and
    /// `IRON_PROTOCOL`. Default none: tasks reach no API.
    pub api: Option<PublishedApi>,
    /// Networks besides the managed one and `none` that a code may name. Default none.
    pub named_networks: Vec<String>,
    /// Run tasks on the managed network without isolating it when the engine cannot (no
    /// root, no iptables, a remote engine). Default false: the runner then refuses to start.
    pub unguarded: bool,
}

/// Where tasks find the API: `protocol://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedApi {
    /// `http` or `https`.
    pub protocol: String,
    /// A host name or an IPv4 address.
    pub host: String,
    pub port: u16,
}

// === impl TaskNetworkConfig ===

impl Default for TaskNetworkConfig {
    fn default() -> Self {
        TaskNetworkConfig {
            spec: NetworkSpec {
                name: "stevedore-tasks".to_owned(),
                bridge: "stevedore0".to_owned(),
                subnet: None,
            },
            blocked: EgressPolicy::default_blocked(),
            allowed: Vec::new(),
            api: None,
            named_networks: Vec::new(),
            unguarded: false,
        }
    }
}

impl TaskNetworkConfig {
    /// The engine's network for a code's `network`: the managed one for `bridge`, `none`
    /// as it is, a listed network by its name. Anything else is refused with a message for
    /// the task (a code stored before the operator changed the list).
    pub fn engine_network(&self, code_network: &str) -> Result<String, String> {
        match code_network {
            DEFAULT_NETWORK => Ok(self.spec.name.clone()),
            NO_NETWORK => Ok(NO_NETWORK.to_owned()),
            named if self.named_networks.iter().any(|allowed| allowed == named) => {
                Ok(named.to_owned())
            }
            other => Err(format!(
                "the code's network {other:?} is not allowed on this runner (allowed: \
                 {DEFAULT_NETWORK}, {NO_NETWORK}{})",
                self.named_networks
                    .iter()
                    .map(|name| format!(", {name}"))
                    .collect::<String>()
            )),
        }
    }

    /// The environment that tells a task where the API is, when it is published.
    pub(crate) fn api_env(&self) -> Vec<(String, String)> {
        self.api
            .iter()
            .flat_map(|api| {
                [
                    ("IRON_HOST".to_owned(), api.host.clone()),
                    ("IRON_PORT".to_owned(), api.port.to_string()),
                    ("IRON_PROTOCOL".to_owned(), api.protocol.clone()),
                ]
            })
            .collect()
    }
}

/// Makes sure the managed network exists and has the engine isolate it. Refuses when the
/// network cannot be had, or cannot be isolated and `unguarded` is not set.
pub(crate) async fn prepare(
    engine: &dyn ContainerEngine,
    config: &TaskNetworkConfig,
) -> Result<NetworkInfo, RunnerError> {
    let started = std::time::Instant::now();
    let network = engine
        .ensure_network(&config.spec)
        .await
        .map_err(RunnerError::TaskNetwork)?;
    let policy = EgressPolicy {
        blocked: config.blocked.clone(),
        allowed: allowed_destinations(config).await?,
    };
    match engine.isolate_network(&network, &policy).await {
        Ok(()) => {}
        Err(error) if config.unguarded => {
            tracing::warn!(
                network = %network.name,
                %error,
                "the task network is NOT isolated (task_network.unguarded is set): tasks can \
                 reach this host, each other and private ranges"
            );
        }
        Err(error) => return Err(RunnerError::TaskNetworkUnguarded(error)),
    }
    tracing::info!(
        network = %network.name,
        bridge = ?network.bridge,
        subnets = ?network.subnets.iter().map(ToString::to_string).collect::<Vec<_>>(),
        took_ms = started.elapsed().as_millis(),
        "task network ready"
    );
    Ok(network)
}

/// The operator's allowed destinations, and the published API's addresses and port.
async fn allowed_destinations(config: &TaskNetworkConfig) -> Result<Vec<Destination>, RunnerError> {
    let mut allowed = config.allowed.clone();
    if let Some(api) = &config.api {
        let addresses = tokio::net::lookup_host((api.host.as_str(), api.port))
            .await
            .map_err(|error| {
                RunnerError::InvalidConfig(format!(
                    "cannot resolve the published API host {:?}: {error}",
                    api.host
                ))
            })?;
        let before = allowed.len();
        for address in addresses {
            if let IpAddr::V4(ip) = address.ip() {
                allowed.push(Destination::address(ip, api.port));
            }
        }
        if allowed.len() == before {
            return Err(RunnerError::InvalidConfig(format!(
                "the published API host {:?} has no IPv4 address, and the task network has no \
                 IPv6",
                api.host
            )));
        }
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_means_the_managed_network_and_others_must_be_listed() {
        let config = TaskNetworkConfig {
            named_networks: vec!["databases".to_owned()],
            ..TaskNetworkConfig::default()
        };
        assert_eq!(
            config.engine_network("bridge"),
            Ok("stevedore-tasks".to_owned())
        );
        assert_eq!(config.engine_network("none"), Ok("none".to_owned()));
        assert_eq!(
            config.engine_network("databases"),
            Ok("databases".to_owned())
        );
        let refused = config.engine_network("host").unwrap_err();
        assert!(refused.contains("bridge, none, databases"), "{refused}");
    }

    #[test]
    fn the_published_api_reaches_tasks_as_iron_variables() {
        assert!(TaskNetworkConfig::default().api_env().is_empty());
        let config = TaskNetworkConfig {
            api: Some(PublishedApi {
                protocol: "http".to_owned(),
                host: "172.30.0.1".to_owned(),
                port: 8080,
            }),
            ..TaskNetworkConfig::default()
        };
        assert_eq!(
            config.api_env(),
            vec![
                ("IRON_HOST".to_owned(), "172.30.0.1".to_owned()),
                ("IRON_PORT".to_owned(), "8080".to_owned()),
                ("IRON_PROTOCOL".to_owned(), "http".to_owned()),
            ]
        );
    }
}
