//! Task networking with real containers, through the real binary: a task on the isolated
//! task network cannot connect to a listener on the host (on the network's gateway, on the
//! host's own address, on a link-local address), nor to another task's container; it can
//! connect to a destination the operator allowed, to the internet (when this machine reaches
//! it at all), and to the published API, through which it queues a follow-up task.
//!
//! The test runs on a task network of its own (name and bridge), so its allowed destinations
//! never mix with other tests' runners on the default one. Changing the host firewall and
//! adding an address need root: without it the test is skipped, except in CI.

use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Api, ServerProcess, docker_available, ensure_local_image, in_ci, unique};

const NETWORK: &str = "stevedore-network-test";
const BRIDGE: &str = "stvd-nettest";
const LINK_LOCAL: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const PYTHON: &str = "stevedore/stack-python:3.11-local";
const TASK_WAIT: Duration = Duration::from_secs(120);

/// Tries each `[name, host, port]` of the payload's `targets` and prints `name=open` or
/// `name=closed (error)`; then queues the follow-up task through the published API with
/// the payload's token and prints `followup=<id>`.
const PROBER: &str = r#"
import json, os, socket, urllib.request
payload = json.load(open(os.environ["PAYLOAD_FILE"]))
for name, host, port in payload["targets"]:
    try:
        socket.create_connection((host, port), timeout=3).close()
        print(f"{name}=open", flush=True)
    except OSError as error:
        print(f"{name}=closed ({error})", flush=True)
api = f"{os.environ['IRON_PROTOCOL']}://{os.environ['IRON_HOST']}:{os.environ['IRON_PORT']}"
request = urllib.request.Request(
    f"{api}/2/projects/{payload['project_id']}/tasks",
    data=json.dumps({"tasks": [{"code_name": payload["followup"], "payload": "{}"}]}).encode(),
    headers={"Authorization": f"OAuth {payload['token']}", "Content-Type": "application/json"},
    method="POST",
)
with urllib.request.urlopen(request, timeout=10) as answer:
    print("followup=" + json.load(answer)["tasks"][0]["id"], flush=True)
"#;

/// Listens on port 7000 and prints its own address, then waits to be cancelled.
const LISTENER: &str = r#"
import socket, time
server = socket.socket()
server.bind(("0.0.0.0", 7000))
server.listen(16)
print("address=" + socket.gethostbyname(socket.gethostname()), flush=True)
time.sleep(600)
"#;

/// Removes the link-local address when dropped, if this test added it.
struct AddedAddress(Option<String>);

impl Drop for AddedAddress {
    fn drop(&mut self) {
        if let Some(address) = self.0.take() {
            let _ = Command::new("ip")
                .args(["addr", "del", &address, "dev", "lo"])
                .status();
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
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

/// Adds `169.254.169.254/32` to the loopback interface (unless it is there already).
fn add_link_local() -> AddedAddress {
    let address = format!("{LINK_LOCAL}/32");
    let added = Command::new("ip")
        .args(["addr", "add", &address, "dev", "lo"])
        .status()
        .is_ok_and(|status| status.success());
    AddedAddress(added.then_some(address))
}

/// Whether this machine itself reaches `host:80` (a loose test of "the internet").
fn host_reaches(host: &str) -> Option<(String, u16)> {
    use std::net::ToSocketAddrs;
    let address = (host, 80).to_socket_addrs().ok()?.find(|a| a.is_ipv4())?;
    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(3)).ok()?;
    Some((host.to_owned(), 80))
}

fn log_lines(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_reaches_the_internet_allowed_addresses_and_the_api_but_not_the_host_or_other_tasks()
{
    if !docker_available() {
        return;
    }
    if !is_root() {
        assert!(!in_ci(), "CI must run the network test as root");
        eprintln!("skipped: isolating the task network needs root");
        return;
    }
    ensure_local_image();
    let host = host_address();
    let _link_local = add_link_local();
    // Listening is enough: the kernel completes a connection into the backlog unaccepted.
    let everywhere = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = everywhere.local_addr().unwrap().port();
    let link_local = TcpListener::bind((LINK_LOCAL, 0)).unwrap();
    let link_local_port = link_local.local_addr().unwrap().port();
    let allowed = TcpListener::bind((host, 0)).unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    let api_port = TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let data = tempfile::tempdir().unwrap();
    let runner_id = unique("network");
    let allowed_setting = format!("[\"{host}:{allowed_port}\"]");
    let api_url = format!("http://{host}:{api_port}");
    let server = ServerProcess::start_listening(
        data.path(),
        &format!("0.0.0.0:{api_port}"),
        &[],
        &[
            ("STEVEDORE_RUNNER__ID", runner_id.as_str()),
            ("STEVEDORE_RUNNER__LEASE_SECS", "3"),
            ("STEVEDORE_RUNNER__SHUTDOWN_GRACE_SECS", "5"),
            ("STEVEDORE_TASK_NETWORK__NAME", NETWORK),
            ("STEVEDORE_TASK_NETWORK__BRIDGE", BRIDGE),
            ("STEVEDORE_TASK_NETWORK__ALLOWED", allowed_setting.as_str()),
            ("STEVEDORE_TASK_NETWORK__API_URL", api_url.as_str()),
        ],
    );
    let api = Api::new(&server);
    let gateway = network_gateway();

    for (name, script) in [("listener", LISTENER), ("prober", PROBER)] {
        api.post(
            "codes",
            json!({
                "name": name,
                "image": PYTHON,
                "command": "python3 -c \"$SCRIPT\"",
                "env_vars": {"SCRIPT": script},
                "timeout": 300,
            }),
        )
        .await;
    }
    api.post(
        "codes",
        json!({"name": "followup", "image": "stevedore/busybox:local", "command": "echo followed up"}),
    )
    .await;

    // Another task, listening, with its address in its log.
    let listener = api
        .queue(json!([{"code_name": "listener", "payload": "{}"}]))
        .await;
    let listener = listener[0].clone();
    let deadline = std::time::Instant::now() + TASK_WAIT;
    let neighbour = loop {
        let log = api.log(&listener).await.unwrap_or_default();
        if let Some((_, address)) = log_lines(&log).into_iter().find(|(k, _)| k == "address") {
            break address;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the listener never told its address: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let internet = host_reaches("deb.debian.org");
    let mut targets = vec![
        json!(["gateway", gateway, host_port]),
        json!(["host", host.to_string(), host_port]),
        json!(["api_on_gateway", gateway, api_port]),
        json!(["link_local", LINK_LOCAL.to_string(), link_local_port]),
        json!(["neighbour", neighbour, 7000]),
        json!(["allowed", host.to_string(), allowed_port]),
    ];
    if let Some((name, port)) = &internet {
        targets.push(json!(["internet", name, port]));
    } else {
        eprintln!("this machine reaches no internet host: the task's reach of it is not tested");
    }
    let payload = json!({
        "targets": targets,
        "project_id": server.iron["project_id"],
        "token": server.token(),
        "followup": "followup",
    });
    let prober = api
        .queue(json!([{"code_name": "prober", "payload": payload.to_string()}]))
        .await;
    let finished = api.wait_finished(&prober[0], TASK_WAIT).await;
    let log = api.log(&prober[0]).await.unwrap_or_default();
    api.post(&format!("tasks/{listener}/cancel"), json!({}))
        .await;
    assert_eq!(finished["status"], "complete", "{finished} {log}");

    eprintln!("the prober's log:\n{log}");
    let seen = log_lines(&log);
    let state = |name: &str| {
        seen.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.split(' ').next().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no {name} in the log: {log}"))
    };
    for closed in [
        "gateway",
        "host",
        "api_on_gateway",
        "link_local",
        "neighbour",
    ] {
        assert_eq!(
            state(closed),
            "closed",
            "{closed} (gateway {gateway}, host {host}): {log}"
        );
    }
    assert_eq!(state("allowed"), "open", "{log}");
    if internet.is_some() {
        assert_eq!(state("internet"), "open", "{log}");
    }

    // The follow-up the task queued through the published API exists, and runs.
    let followup = state("followup");
    let followed = api.wait_finished(&followup, TASK_WAIT).await;
    assert_eq!(followed["code_name"], "followup", "{followed}");
    assert_eq!(followed["status"], "complete", "{followed}");
    // The host's listeners were there all along: this machine reaches them.
    std::net::TcpStream::connect((host, host_port)).unwrap();
    std::net::TcpStream::connect((LINK_LOCAL, link_local_port)).unwrap();
    drop((everywhere, link_local, allowed));
}

/// A code naming a network the operator does not list is refused at upload, with the
/// allowed values in the message; a listed one is accepted.
#[tokio::test]
async fn only_listed_networks_are_accepted_at_upload() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(
        data.path(),
        &[
            ("STEVEDORE_RUNNER__ENABLED", "false"),
            ("STEVEDORE_TASK_NETWORK__NAMED_NETWORKS", "[\"databases\"]"),
        ],
    );
    let api = Api::new(&server);
    let http = reqwest::Client::new();
    for (network, accepted) in [
        ("bridge", true),
        ("none", true),
        ("databases", true),
        ("host", false),
        ("elsewhere", false),
    ] {
        let answer = http
            .post(server.url("codes"))
            .header("Authorization", format!("OAuth {}", server.token()))
            .json(&json!({"name": "n", "image": "stevedore/busybox:local", "network": network}))
            .send()
            .await
            .unwrap();
        let status = answer.status();
        let body: Value = answer.json().await.unwrap();
        if accepted {
            assert!(status.is_success(), "{network}: {status} {body}");
        } else {
            assert_eq!(status, 400, "{network}: {body}");
            let message = body["msg"].as_str().unwrap_or_default();
            assert!(message.contains("network"), "{network}: {message}");
        }
    }
    let refused = http
        .post(server.url("codes"))
        .header("Authorization", format!("OAuth {}", server.token()))
        .json(&json!({"name": "n", "image": "stevedore/busybox:local", "network": "elsewhere"}))
        .send()
        .await
        .unwrap();
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["msg"]
            .as_str()
            .unwrap_or_default()
            .contains(r#"["bridge", "none", "databases"]"#),
        "{body}"
    );
    drop(api);
}

/// The test network's gateway, as Docker reports it.
fn network_gateway() -> String {
    let output = Command::new("docker")
        .args([
            "network",
            "inspect",
            NETWORK,
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ])
        .output()
        .unwrap();
    let gateway = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(!gateway.is_empty(), "no gateway of {NETWORK}");
    gateway
}
