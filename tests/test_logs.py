"""Structured logs: the formats, the task and request context on every line, a task's whole life through a
`kill -9` as JSON, and a failed start-up as one line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from conftest import free_port, make_key, wait_terminal
from keel import logs
from keel.app import redacted
from keel.settings import Settings
from keel_processes import KEEL, Servers


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """keel's handler on a buffer; the root logger as it was afterwards."""
    root, keel = logging.getLogger(), logging.getLogger("keel")
    saved = (list(root.handlers), root.level, keel.level)
    out = io.StringIO()
    try:
        yield out
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                root.removeHandler(handler)
        root.setLevel(saved[1])
        keel.setLevel(saved[2])


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_json_lines_carry_the_task_and_request_they_are_about(stream: io.StringIO) -> None:
    assert logs.configure("json", "info", stream=stream) == "json"
    log = logging.getLogger("keel.test")
    log.info("before")
    token = logs.request_id.set("req-1")
    try:
        with logs.task_scope("t-1", "acme", "req-0"):
            log.info("during %s", "a run")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
        log.info("after")
    finally:
        logs.request_id.reset(token)
    log.debug("below the level")
    before, during, failed, after = (json.loads(line) for line in lines(stream))
    assert before["message"] == "before" and before["level"] == "info" and before["logger"] == "keel.test"
    assert not {"task_id", "tenant", "request_id"} & set(before)
    assert during["message"] == "during a run"
    assert (during["task_id"], during["tenant"], during["request_id"]) == ("t-1", "acme", "req-0")
    assert failed["level"] == "error" and "ValueError: boom" in failed["exc_info"] and failed["task_id"] == "t-1"
    assert after == {**after, "request_id": "req-1"} and "task_id" not in after  # the scope restored the context


async def test_asyncio_tasks_started_in_a_run_carry_its_context(stream: io.StringIO) -> None:
    logs.configure("json", "INFO", stream=stream)
    log = logging.getLogger("keel.test")
    with logs.task_scope("t-2", "acme"):
        await asyncio.create_task(asyncio.to_thread(log.info, "from a thread of a child task"))
    (line,) = (json.loads(x) for x in lines(stream))
    assert line["task_id"] == "t-2" and line["tenant"] == "acme" and "request_id" not in line


def test_text_lines_for_a_person(stream: io.StringIO) -> None:
    assert logs.configure("text", "warning", stream=stream) == "text"
    log = logging.getLogger("keel.test")
    log.info("hidden at warning")
    with logs.task_scope("t-3", "acme", "req-3"):
        log.warning("lease lost")
    (line,) = lines(stream)
    assert line.endswith("WARNING keel.test: lease lost [task_id=t-3 tenant=acme request_id=req-3]")


def test_configuring_again_replaces_the_handler(stream: io.StringIO) -> None:
    logs.configure("text", stream=io.StringIO())
    logs.configure("json", stream=stream)
    logging.getLogger("keel.test").info("once")
    assert len(lines(stream)) == 1
    assert sum(1 for h in logging.getLogger().handlers if h.get_name() == "keel") == 1


def test_the_default_stream_is_stderr_as_it_is_when_a_line_is_logged(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.configure("json")
    first.close()  # as a test runner closes the stderr it lent a command
    monkeypatch.setattr(sys, "stderr", stream)
    logging.getLogger("keel.test").info("still heard")
    assert json.loads(stream.getvalue())["message"] == "still heard"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_default_format_is_text_on_a_terminal_and_json_otherwise() -> None:
    assert logs.resolve_format(None, Tty()) == "text"
    assert logs.resolve_format(None, io.StringIO()) == "json"
    assert logs.resolve_format("json", Tty()) == "json"


def test_log_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_LOG_FORMAT", "JSON")
    monkeypatch.setenv("KEEL_LOG_LEVEL", "debug")
    settings = Settings()
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    monkeypatch.setenv("KEEL_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError):
        Settings()


# -- a real server ---------------------------------------------------------------------------------------------

JSON_LOGS = {"KEEL_LOG_FORMAT": "json", "KEEL_LOG_LEVEL": "info", "KEEL_EMBEDDING_MODEL": "hash:64"}


def parsed(log: Path) -> list[dict[str, Any]]:
    """Every line of a server's output, each of which must be a JSON object."""
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_every_line_of_a_task_life_through_kill9_is_json_and_names_the_task(servers: Servers, tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "keel"
    data_dir.mkdir()
    key = make_key(data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
    first = servers.start(port, data_dir, env=JSON_LOGS)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=first.url, headers=auth, timeout=10) as c:
        r = c.post(
            "/v1/tasks",
            json={"workflow": "diagnostic", "input": {"steps": 8, "step_seconds": 0.3}},
            headers={"X-Request-ID": "req-life-1"},
        )
        assert r.status_code == 202 and r.headers["x-request-id"] == "req-life-1"
        task_id = r.json()["id"]
        deadline = time.monotonic() + 15
        while c.get(f"/v1/tasks/{task_id}").json()["progress"] < 0.25:
            assert time.monotonic() < deadline, "the task made no progress"
            time.sleep(0.05)
    first.kill9()
    second = servers.start(port, data_dir, env=JSON_LOGS)
    with httpx.Client(base_url=second.url, headers=auth, timeout=10) as c:
        assert wait_terminal(c, task_id, timeout=30)["status"] == "succeeded"
    time.sleep(0.2)  # the run's last line follows the write the client saw

    before, after = parsed(first.log), parsed(second.log)
    assert any(line["message"].startswith("keel started: role=all store=sqlite:") for line in before)
    assert any(line["message"] == "re-queued 1 task(s) left running by a dead process" for line in after)
    about_task = [line for line in before + after if line.get("task_id") == task_id]
    assert [line["message"] for line in about_task] == [
        "queued diagnostic",
        "running diagnostic (attempt 1)",
        "running diagnostic (attempt 2)",
        "run ended: succeeded",
    ]
    assert all(line["tenant"] == "acme" and line["request_id"] == "req-life-1" for line in about_task)
    # No line mentions the task without carrying it.
    assert [line for line in before + after if task_id in json.dumps(line) and line.get("task_id") != task_id] == []


def start_failure(tmp_path: Path, data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    full.update({"KEEL_DEFAULT_MODEL": "test", "KEEL_EMBEDDING_MODEL": "hash:64", **env})
    cmd = [str(KEEL), "serve", "--port", str(free_port()), "--data-dir", str(data_dir)]
    return subprocess.run(cmd, env=full, cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_second_server_on_the_same_data_dir_fails_in_one_line(servers: Servers, tmp_path: Path) -> None:
    data_dir = tmp_path / "keel"
    servers.start(free_port(), data_dir, env=JSON_LOGS)
    done = start_failure(tmp_path, data_dir, {"KEEL_LOG_FORMAT": "text"})
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: another keel process is serving {data_dir}; the embedded runtime needs it to itself"
    ]


@pytest.mark.parametrize(
    ("env", "status", "line"),
    [
        ({"KEEL_EMBEDDING_MODEL": "nowhere:x"}, 1, "error: unknown embedder spec 'nowhere:x'; accepted forms: "),
        ({"KEEL_LOG_FORMAT": "xml"}, 2, "error: bad setting: log_format: Input should be 'json' or 'text'"),
        ({"KEEL_WORKERS": "0"}, 2, "error: bad setting: workers: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_setting_fails_in_one_line(tmp_path: Path, env: dict[str, str], status: int, line: str) -> None:
    done = start_failure(tmp_path, tmp_path / "keel", env)
    assert done.returncode == status
    (only,) = done.stderr.splitlines()
    assert only.startswith(line), only
    assert "Traceback" not in done.stderr + done.stdout


def test_a_worker_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    cmd = [str(KEEL), "worker", "--data-dir", str(tmp_path / "keel")]
    done = subprocess.run(cmd, env=full, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    (only,) = done.stderr.splitlines()
    assert only.startswith("error: role 'worker' needs a store shared by every process"), only


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigterm_stops_the_server_cleanly_and_says_so(servers: Servers, tmp_path: Path) -> None:
    server = servers.start(free_port(), tmp_path / "keel", env=JSON_LOGS)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert parsed(server.log)[-1]["message"] == "keel stopped"  # after the store closed, not cut short


def test_urls_in_logs_lose_their_password() -> None:
    assert redacted("postgresql://keel:s3cr3t@db:5432/keel") == "postgresql://keel:***@db:5432/keel"
    assert redacted("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redacted("sqlite:///.keel/keel.db") == "sqlite:///.keel/keel.db"
