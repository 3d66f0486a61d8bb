"""Shared pytest setup for stevedore client-compatibility tests.

Server location (first match wins):
  STEVEDORE_IRON_JSON  path to the iron.json the server writes
                       (host/port/protocol/project_id/token/api_version)
  STEVEDORE_HOST, STEVEDORE_PORT, STEVEDORE_PROJECT_ID, STEVEDORE_TOKEN
                       (+ optional STEVEDORE_PROTOCOL, default "http")
Tests needing a server are skipped when neither is set.
STEVEDORE_RUNS_TASKS=1 enables tests marked `runs_containers`.
STEVEDORE_TEST_TIMEOUT (seconds, default 180) bounds every test.
"""
import json
import os
import signal

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "runs_containers: needs a stevedore server that actually executes tasks "
        "(enabled by STEVEDORE_RUNS_TASKS=1)",
    )
    config.addinivalue_line("markers", "needs_server: needs a live stevedore server")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("STEVEDORE_RUNS_TASKS") == "1":
        return
    skip = pytest.mark.skip(reason="set STEVEDORE_RUNS_TASKS=1 to run tasks in containers")
    for item in items:
        if "runs_containers" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stevedore_settings():
    """Dict with host, port, protocol, project_id, token, api_version and
    iron_json (path or None). Skips when no server is configured."""
    path = os.environ.get("STEVEDORE_IRON_JSON")
    if path:
        path = os.path.abspath(path)
        with open(path) as f:
            raw = json.load(f)
        sub = raw.get("iron_worker") or {}
        merged = dict(raw, **sub)
        return {
            "host": merged["host"],
            "port": int(merged.get("port", 443)),
            "protocol": merged.get("protocol", "https"),
            "project_id": merged["project_id"],
            "token": merged["token"],
            "api_version": str(merged.get("api_version", 2)),
            "iron_json": path,
        }
    env = os.environ
    if not all(env.get(k) for k in ("STEVEDORE_HOST", "STEVEDORE_PORT",
                                    "STEVEDORE_PROJECT_ID", "STEVEDORE_TOKEN")):
        pytest.skip("no stevedore server configured (STEVEDORE_IRON_JSON or STEVEDORE_HOST/...)")
    return {
        "host": env["STEVEDORE_HOST"],
        "port": int(env["STEVEDORE_PORT"]),
        "protocol": env.get("STEVEDORE_PROTOCOL", "http"),
        "project_id": env["STEVEDORE_PROJECT_ID"],
        "token": env["STEVEDORE_TOKEN"],
        "api_version": "2",
        "iron_json": None,
    }


@pytest.fixture(autouse=True)
def _bounded_test_time():
    """The official clients call requests without a timeout; never hang CI."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    seconds = int(os.environ.get("STEVEDORE_TEST_TIMEOUT", "180"))

    def on_alarm(signum, frame):
        raise TimeoutError("test exceeded %ss (STEVEDORE_TEST_TIMEOUT)" % seconds)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
