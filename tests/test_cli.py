"""The CLI as a user meets it: keys, submit with progress, tasks list/show/cancel, clear errors."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import LiveServer, free_port
from keel.cli import app
from keel.settings import Settings
from keel.testing.analyst import ScriptedAnalyst
from keel.testing.fake_llm import FakeOpenAIServer
from keel.testing.pdfs import make_pdf
from pdf_site import PdfSite

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_REQUEST = "Analyse these documents, compare insights, and tell me the risks."


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
    assert "not cancelled: it had already ended (succeeded)" in cancelled.stderr


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


def readme_submit_lines() -> list[str]:
    """Every ``keel submit`` command in the README, in code blocks or inline code, without its comment."""
    return [m.strip() for m in re.findall(r"keel (submit [^`\n]*)", README.read_text())]


def test_every_readme_submit_line_runs_as_written(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README.md's ``keel submit`` commands, placeholders filled in: ``a.pdf`` and ``b.pdf`` are files in the
    working directory, ``doc_…`` an uploaded document and ``https://example.com/…`` a loopback server."""
    lines = readme_submit_lines()
    assert any(line.startswith("submit document_analysis -d a.pdf -d b.pdf") for line in lines), lines
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
    monkeypatch.chdir(tmp_path)
    for name in ("a.pdf", "b.pdf"):
        (tmp_path / name).write_bytes(make_pdf([f"Contract {name}: payment is due within 30 days."]))
    site = PdfSite(make_pdf(["Contract d: payment is due within 60 days."]))
    with FakeOpenAIServer() as llm:
        try:
            llm.respond_with(ScriptedAnalyst().http_reply)
            settings.default_model = f"openai-compatible:{llm.base_url}#analyst-2026-01-01"
            settings.model_prices = {"analyst": {"input": 1.0, "output": 2.0, "context_window": 16_000}}
            settings.embedding_model = "hash:64"
            settings.fetch_allow_hosts = "127.0.0.1"
            live: LiveServer = request.getfixturevalue("live")
            args = ["--url", live.url, "--api-key", live.key]
            uploaded = runner.invoke(app, ["documents", "add", "a.pdf", *args])
            assert uploaded.exit_code == 0, uploaded.output
            doc_id = re.search(r"doc_\w+", uploaded.output)
            assert doc_id is not None, uploaded.output
            for line in lines:
                filled = (
                    line.removesuffix("…").replace("doc_…", doc_id.group()).replace("https://example.com", site.url)
                )
                r = runner.invoke(app, [*shlex.split(filled), *args])
                assert r.exit_code == 0, (line, r.output)
                envelope = json.loads(r.stdout)
                assert envelope["status"] in ("success", "partial_success"), (line, envelope)
        finally:
            site.close()
    # `-d a.pdf -d b.pdf` with no --input: the two uploads are the documents, the request is the default one
    analysis = [r for r in llm.requests if any(DEFAULT_REQUEST in str(m.get("content")) for m in r["messages"])]
    assert analysis, "the document_analysis default request never reached the model"
    with live.client() as c:
        tasks = {t["workflow"]: t for t in c.get("/v1/tasks", params={"limit": 50}).json()["items"]}
        task = c.get(f"/v1/tasks/{tasks['document_analysis']['id']}").json()
    assert task["status"] == "succeeded", task


class CuttingProxy:
    """A loopback TCP proxy in front of a server that cuts the first event stream through it once two events have
    passed, as a dropped connection would, and keeps the head of every request that opens a connection."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.heads: list[bytes] = []
        self.cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(self.upstream)
        head = conn.recv(65536)
        self.heads.append(head)
        up.sendall(head)
        cutting = not self.cut and b"/events" in head.split(b"\r\n", 1)[0]
        self.cut = self.cut or cutting
        threading.Thread(target=self._pipe, args=(conn, up), daemon=True).start()
        seen = b""
        with contextlib.suppress(OSError):
            while data := up.recv(65536):
                conn.sendall(data)
                seen += data
                if cutting and seen.count(b"\nid: ") + seen.startswith(b"id: ") >= 2:
                    break
        for s in (conn, up):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


def test_workflows_list_names_every_workflow(live: LiveServer) -> None:
    r = runner.invoke(app, ["workflows", "list", "--url", live.url, "--api-key", live.key])
    assert r.exit_code == 0, r.output
    for name in ("diagnostic", "document_analysis", "ask", "tool_call"):
        assert name in r.stdout
    assert "steps?" in r.stdout  # diagnostic's optional input field


def test_tasks_watch_reattaches_and_resumes_after_a_dropped_connection(live: LiveServer) -> None:
    with live.client() as c:
        tid = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 8, "step_seconds": 0.3}}).json()[
            "id"
        ]
    proxy = CuttingProxy(live.url)
    try:
        r = runner.invoke(app, ["tasks", "watch", tid, "--url", proxy.url, "--api-key", live.key])
    finally:
        proxy.close()
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] == "success"
    streams = [h for h in proxy.heads if b"/events" in h.split(b"\r\n", 1)[0]]
    assert proxy.cut and len(streams) >= 2, proxy.heads
    resumed = re.search(rb"(?i)\r\nlast-event-id: (\d+)\r\n", streams[1])
    assert resumed and int(resumed.group(1)) >= 2  # resumed after the events already shown, not from the start
    with live.client() as c:
        assert c.get(f"/v1/tasks/{tid}").json()["status"] == "succeeded"
    missing = runner.invoke(
        app, ["tasks", "watch", "tsk_0123456789abcdef01234567", "--url", live.url, "--api-key", live.key]
    )
    assert missing.exit_code == 1 and "HTTP 404" in missing.output and "Traceback" not in missing.output


def test_result_and_quiet_output_modes(live: LiveServer) -> None:
    args = ["--url", live.url, "--api-key", live.key]
    diag = ["submit", "diagnostic", "-i", '{"steps": 2, "step_seconds": 0}']
    quiet = runner.invoke(app, [*diag, "--quiet", *args])
    assert quiet.exit_code == 0 and quiet.stdout == "succeeded\n", quiet.output
    assert "submitted" not in quiet.stderr and "%" not in quiet.stderr  # no "submitted" line, no progress bar
    only = runner.invoke(app, [*diag, "--result", *args])
    assert only.exit_code == 0, only.output
    with live.client() as c:
        tid = c.get("/v1/tasks").json()["items"][0]["id"]
        assert json.loads(only.stdout) == c.get(f"/v1/tasks/{tid}").json()["envelope"]["result"]
    handle = runner.invoke(app, [*diag, "--no-follow", "-q", *args])
    assert handle.exit_code == 0 and re.fullmatch(r"tsk_\w+\n", handle.stdout), handle.output
    shown = runner.invoke(app, ["tasks", "show", tid, "--quiet", *args])
    assert shown.exit_code == 0 and shown.stdout == "succeeded\n"
    shown = runner.invoke(app, ["tasks", "show", tid, "--result", *args])
    assert json.loads(shown.stdout) == json.loads(only.stdout)
    both = runner.invoke(app, ["tasks", "show", tid, "--result", "--quiet", *args])
    assert both.exit_code == 2 and "choose one of --result and --quiet" in both.output


def test_tasks_cancel_waits_for_and_reports_the_final_state(live: LiveServer) -> None:
    args = ["--url", live.url, "--api-key", live.key]
    with live.client() as c:
        tid = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 50, "step_seconds": 0.2}}).json()[
            "id"
        ]
        deadline = time.monotonic() + 10
        while c.get(f"/v1/tasks/{tid}").json()["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    r = runner.invoke(app, ["tasks", "cancel", tid, *args])
    assert r.exit_code == 0, r.output
    task = json.loads(r.stdout)
    assert task["status"] == "cancelled" and task["envelope"] is not None
    assert f"cancelled {tid}" in r.stderr
    again = runner.invoke(app, ["tasks", "cancel", tid, "--quiet", *args])
    assert again.exit_code == 0 and again.stdout == "cancelled\n"


def test_version_is_the_packages() -> None:
    import keel

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout == f"keel {keel.__version__}\n"
