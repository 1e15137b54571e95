"""Shared fixtures: a real keel server (uvicorn on loopback) in a background thread, and API keys."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from keel.app import create_app
from keel.backends import open_store
from keel.settings import Settings
from keel_processes import servers  # noqa: F401 - a fixture for the crash tests
from postgres_server import pg_store, postgres_url  # noqa: F401 - fixtures: one Postgres for the session
from webhook_receiver import receiver  # noqa: F401 - a fixture: a loopback webhook receiver

REQUIRE_LOCAL = os.environ.get("KEEL_REQUIRE_LOCAL") == "1"
"""Set by .ci/run, which installs the `local` extra and every system dependency: there a skipped test is a failure,
never a silent skip (a skipped test once hid a llama.cpp build that crashed on users' CPUs; a Postgres that does not
start must not pass as a skipped conformance suite). The one exception is an interpreter the runner cannot have
(tests/test_package.py: its required ones fail on their own, through KEEL_REQUIRE_PYTHONS)."""
_ALLOWED_SKIPS = ("is not on this machine",)


def _untrusted_skip(report: pytest.CollectReport | pytest.TestReport) -> bool:
    return REQUIRE_LOCAL and report.skipped and not any(s in str(report.longrepr) for s in _ALLOWED_SKIPS)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()  # type: ignore[attr-defined]
    if _untrusted_skip(report):
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if _untrusted_skip(report):
        report.outcome = "failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(data_dir: Path, tenant: str, scopes: frozenset[str]) -> str:
    async def create() -> str:
        store = open_store(f"sqlite:///{data_dir / 'keel.db'}")
        try:
            return await store.create_key(tenant, scopes, time.time())
        finally:
            await store.aclose()

    return asyncio.run(create())


@dataclass
class LiveServer:
    url: str
    data_dir: Path
    settings: Settings
    key: str  # tenant "acme", tasks:read + tasks:write

    def client(self, key: str | None = None, **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]

    def new_key(self, tenant: str, scopes: str = "tasks:read,tasks:write") -> str:
        return make_key(self.data_dir, tenant, frozenset(scopes.split(",")))


def start_server(settings: Settings) -> tuple[uvicorn.Server, threading.Thread]:
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("keel test server did not start")
        time.sleep(0.02)
    return server, thread


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "keel",
        port=free_port(),
        poll_interval_s=0.05,
        lease_seconds=3,
        webhook_allow_hosts="127.0.0.1",
        webhook_backoff_base_s=0.05,
        webhook_backoff_max_s=0.2,
        max_body_bytes=64 * 1024,
        default_model="test",  # the scripted model; the embedded one has tests of its own
    )


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = make_key(settings.data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
    server, thread = start_server(settings)
    try:
        yield LiveServer(
            url=f"http://127.0.0.1:{settings.port}", data_dir=settings.data_dir, settings=settings, key=key
        )
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_terminal(client: httpx.Client, task_id: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, object] = client.get(f"/v1/tasks/{task_id}").json()
        if body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish in {timeout}s")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The scale-out servers the tests started (Postgres, Redis, Temporal; see ``scaleout.py``) stop with the run."""
    import sys

    scaleout = sys.modules.get("scaleout")
    if scaleout is not None:
        scaleout.stop_services()
