#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine, installing and starting it when needed.
#
# Idempotent and meant to run as root on a plain Debian 12 machine, including one where PID 1 is
# not systemd (a container, a CI sandbox, a microVM): it installs `docker.io` (the engine) and
# `busybox-static` (the source of stevedore's local `stevedore/busybox:local` image) and `crun`
# (the direct OCI engine's runtime) with apt-get when they are missing, starts `dockerd` in the background when `docker info` does not answer,
# and waits a bounded time for the engine to come up.
#
# Environment:
#   STEVEDORE_DOCKERD_LOG     where dockerd's output goes (default /var/log/stevedore-dockerd.log)
#   STEVEDORE_DOCKER_WAIT_S   how long to wait for the engine to answer (default 60 seconds)
set -euo pipefail

dockerd_log="${STEVEDORE_DOCKERD_LOG:-/var/log/stevedore-dockerd.log}"
wait_seconds="${STEVEDORE_DOCKER_WAIT_S:-60}"

log() { printf 'ensure-docker: %s\n' "$*" >&2; }
fail() { printf 'ensure-docker: ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    fail "must run as root (it installs packages and starts dockerd)"
fi

# --- packages ---------------------------------------------------------------------------------

missing_packages=()
# Another `docker` client (e.g. a newer one in /usr/local/bin) is fine; both must exist.
# ca-certificates is only a recommendation of docker.io, but pulls over TLS need it.
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    missing_packages+=(docker.io ca-certificates)
fi
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    missing_packages+=(busybox-static)
fi
# The runner isolates the task network with iptables (docker.io depends on it, but a Docker
# from elsewhere may not have brought it) and the tests add an address with `ip`.
if ! command -v iptables-restore >/dev/null 2>&1 && [ ! -x /usr/sbin/iptables-restore ]; then
    missing_packages+=(iptables)
fi
if ! command -v ip >/dev/null 2>&1 && [ ! -x /usr/sbin/ip ] && [ ! -x /sbin/ip ]; then
    missing_packages+=(iproute2)
fi
# conntrack forgets a finished task's connections: on Docker, task containers join network
# holders only where it is installed (without it each gets a network namespace of its own,
# which costs the engine more); the OCI runtime's task network forgets them with it too.
if ! command -v conntrack >/dev/null 2>&1 && [ ! -x /usr/sbin/conntrack ]; then
    missing_packages+=(conntrack)
fi
# The direct OCI engine runs task containers with crun (runc, which docker.io brings, is its
# fallback); its tests run both.
if ! command -v crun >/dev/null 2>&1 && [ ! -x /usr/bin/crun ]; then
    missing_packages+=(crun)
fi
if [ "${#missing_packages[@]}" -gt 0 ]; then
    log "installing ${missing_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing_packages[@]}" \
        || fail "apt-get install ${missing_packages[*]} failed"
fi

# --- engine -----------------------------------------------------------------------------------

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

if engine_answers; then
    log "docker engine already answers"
    exit 0
fi

# Without systemd nobody mounts the cgroup hierarchy; dockerd cannot enforce limits without it.
if [ -d /sys/fs/cgroup ] && ! mountpoint -q /sys/fs/cgroup && [ -z "$(ls -A /sys/fs/cgroup 2>/dev/null)" ]; then
    log "mounting the cgroup2 hierarchy on /sys/fs/cgroup"
    mount -t cgroup2 none /sys/fs/cgroup || log "could not mount cgroup2; dockerd may refuse to start"
fi

# True when $1 is a live (not zombie) dockerd. `kill -0` alone is not enough: without an init
# that reaps orphans, a killed dockerd lingers as a zombie, and a recycled pid can be anything.
dockerd_alive() {
    local pid="$1" stat comm
    [ -n "${pid}" ] && [ -r "/proc/${pid}/stat" ] || return 1
    comm="$(cat "/proc/${pid}/comm" 2>/dev/null || true)"
    [ "${comm}" = "dockerd" ] || return 1
    # The state is the first field after the parenthesised command name.
    stat="$(sed -e 's/^.*) //' "/proc/${pid}/stat" 2>/dev/null || true)"
    [ "${stat%% *}" != "Z" ]
}

# A dockerd that still runs but does not answer yet is starting (or wedged): wait for it.
# A pid file without a live dockerd is stale and would stop a new dockerd from starting.
if [ -f /var/run/docker.pid ]; then
    old_pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
    if dockerd_alive "${old_pid}"; then
        log "dockerd (pid ${old_pid}) runs but does not answer yet; waiting for it"
    else
        log "removing stale /var/run/docker.pid"
        rm -f /var/run/docker.pid
    fi
fi

if [ ! -f /var/run/docker.pid ]; then
    # The containerd a killed dockerd had started dies with it, and may linger as a zombie
    # for a moment; a new dockerd that finds its pid file waits for it in vain and gives up
    # ("timeout waiting for containerd to start"). Only a live containerd's file stays.
    containerd_pid_file=/var/run/docker/containerd/containerd.pid
    if [ -f "${containerd_pid_file}" ]; then
        containerd_pid="$(cat "${containerd_pid_file}" 2>/dev/null || true)"
        containerd_stat="$(sed -e 's/^.*) //' "/proc/${containerd_pid}/stat" 2>/dev/null || true)"
        if [ "$(cat "/proc/${containerd_pid}/comm" 2>/dev/null || true)" != "containerd" ] \
            || [ "${containerd_stat%% *}" = "Z" ]; then
            log "removing the pid file of a containerd that is gone"
            rm -f "${containerd_pid_file}"
        fi
    fi
    mkdir -p "$(dirname "${dockerd_log}")"
    log "starting dockerd in the background (log: ${dockerd_log})"
    # setsid detaches dockerd from this shell's session so it outlives the script.
    setsid dockerd >>"${dockerd_log}" 2>&1 < /dev/null &
fi

deadline=$(( $(date +%s) + wait_seconds ))
until engine_answers; do
    if [ "$(date +%s)" -ge "${deadline}" ]; then
        log "last lines of ${dockerd_log}:"
        tail -n 30 "${dockerd_log}" >&2 2>/dev/null || true
        fail "docker engine did not answer 'docker info' within ${wait_seconds}s"
    fi
    sleep 1
done
log "docker engine answers: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})' 2>/dev/null || echo unknown)"
