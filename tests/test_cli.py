"""The CLI as a user meets it: keys, submit with progress, tasks list/show/cancel, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import LiveServer, free_port
from keel.cli import app

runner = CliRunner()


def test_keys_create_prints_only_the_key(tmp_path: Path) -> None:
    r = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("keel_")
    bad = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--scopes", "root", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown or empty scopes" in bad.output


def test_submit_follows_stream_and_prints_envelope(live: LiveServer) -> None:
    args = ["--url", live.url, "--api-key", live.key]
    r = runner.invoke(app, ["submit", "diagnostic", "-i", '{"steps": 2, "step_seconds": 0.05}', *args])
    assert r.exit_code == 0, r.output
    envelope = json.loads(r.stdout)
    assert envelope["status"] == "success"
    listed = runner.invoke(app, ["tasks", "list", *args])
    assert listed.exit_code == 0 and "diagnostic" in listed.stdout
    with live.client() as c:
        tid = c.get("/v1/tasks").json()["items"][0]["id"]
    shown = runner.invoke(app, ["tasks", "show", tid, *args])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["status"] == "succeeded"
    cancelled = runner.invoke(app, ["tasks", "cancel", tid, *args])
    assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["status"] == "succeeded"


def test_failed_task_exits_nonzero(live: LiveServer) -> None:
    r = runner.invoke(
        app,
        [
            "submit",
            "diagnostic",
            "-i",
            '{"steps": 2, "step_seconds": 0, "fail_at": 1}',
            "--url",
            live.url,
            "--api-key",
            live.key,
        ],
    )
    assert r.exit_code == 1 and json.loads(r.stdout)["status"] == "failed"


def test_clear_errors(live: LiveServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = runner.invoke(app, ["tasks", "list", "--url", dead, "--api-key", "keel_x_y"])
    assert r.exit_code == 1 and "cannot reach keel" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["submit", "diagnostic", "-i", "{not json", "--url", live.url, "--api-key", live.key])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = runner.invoke(app, ["submit", "nope", "--url", live.url, "--api-key", live.key])
    assert r.exit_code == 1 and "HTTP 422" in r.output and "unknown workflow" in r.output
    r = runner.invoke(app, ["tasks", "list", "--url", live.url, "--api-key", "keel_bad_key"])
    assert r.exit_code == 1 and "HTTP 401" in r.output
    r = runner.invoke(app, ["tasks", "list", "--url", live.url], env={"KEEL_API_KEY": ""})
    assert r.exit_code == 2 and "no API key" in r.output


def test_budget_flags_and_replay(live: LiveServer) -> None:
    args = ["--url", live.url, "--api-key", live.key]
    r = runner.invoke(app, ["submit", "diagnostic", "-i", '{"steps": 4, "step_seconds": 0}', "--max-steps", "2", *args])
    assert r.exit_code == 0, r.output
    envelope = json.loads(r.stdout)
    assert envelope["status"] == "partial_success"
    assert [e["type"] for e in envelope["errors"]] == ["budget_exceeded"]
    with live.client() as c:
        tid = c.get("/v1/tasks").json()["items"][0]["id"]
    # The recorded run stopped at its breaker; replaying it against the same code diverges nowhere.
    replayed = runner.invoke(app, ["tasks", "replay", tid, "--data-dir", str(live.data_dir)])
    assert replayed.exit_code == 0, replayed.output
    report = json.loads(replayed.stdout)
    assert report == {
        "task_id": tid,
        "deterministic": True,
        "replayed_steps": ["step-1", "step-2"],
        "reached_end": False,
        "error": None,
    }
    missing = runner.invoke(app, ["tasks", "replay", "tsk_nope", "--data-dir", str(live.data_dir)])
    assert missing.exit_code == 1 and "no task tsk_nope" in missing.output and "Traceback" not in missing.output


def test_a_task_waiting_for_approval_exits_3_and_tasks_approve_resumes_it(live: LiveServer) -> None:
    key = live.new_key("acme", "tasks:read,tasks:write,tasks:approve,tools:email")
    args = ["--url", live.url, "--api-key", key]
    email = {"tool": "send_email", "args": {"to": ["ops@example.com"], "subject": "hi", "body": "hello"}}
    r = runner.invoke(
        app, ["submit", "tool_call", "-i", json.dumps(email), "--tool", "send_email", "--approve-every-write", *args]
    )
    assert r.exit_code == 3, r.output
    envelope = json.loads(r.stdout)
    [pending] = envelope["result"]["pending_decisions"]
    assert envelope["status"] == "needs_clarification" and pending["tool"] == "send_email"
    assert "keel tasks approve" in r.stderr and pending["call_id"] in r.stderr
    with live.client(key) as c:
        tid = c.get("/v1/tasks").json()["items"][0]["id"]
    listed = runner.invoke(app, ["tasks", "approvals", tid, *args])
    assert listed.exit_code == 0 and "pending" in listed.stdout and "send_email" in listed.stdout
    approved = runner.invoke(app, ["tasks", "approve", tid, pending["call_id"], "--note", "fine", *args])
    assert approved.exit_code == 0, approved.output
    assert json.loads(approved.stdout)["result"]["result"]["queued"] is True
    again = runner.invoke(app, ["tasks", "approve", tid, pending["call_id"], "--deny", *args])
    assert again.exit_code == 1 and "already decided" in again.output
    tools = runner.invoke(app, ["tools", "list", *args])
    assert tools.exit_code == 0 and "send_email" in tools.stdout and "write" in tools.stdout


def test_split_roles_need_a_shared_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_STORE_URL", raising=False)
    for args in (["worker"], ["serve", "--role", "api"]):
        r = runner.invoke(app, [*args, "--data-dir", str(tmp_path)])
        assert r.exit_code == 1, (args, r.output)
        assert "needs a store shared by every process" in " ".join(r.output.split()), r.output
    bad = runner.invoke(app, ["serve", "--role", "worker", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "keel worker" in bad.output
