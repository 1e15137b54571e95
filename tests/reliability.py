"""The outside battery of issue 21, as families of attacks on a real ``keel serve`` on loopback.

Each family takes a running server (or starts its own, for kill -9 and SSRF) and returns a :class:`Family`: how
many requests it sent, and the counts the battery gates on (server errors, lost tasks, duplicates, cross-tenant
leaks, canary hits) plus every defect it saw, described precisely enough to reproduce. ``bench/reliability.py``
runs them at full size and writes docs/reliability.md; ``tests/test_reliability.py`` runs a few cases of each so
CI keeps the battery working. Servers, keys, the canary and the hostile PDFs come from the helpers the tests already
use (``keel_processes``, ``conftest``, ``test_ssrf``, ``keel.testing.pdfs``).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from conftest import free_port, make_key
from keel.testing.fake_llm import FakeOpenAIServer, Reply, ToolCallSpec
from keel.testing.pdfs import corrupt_pdf, make_many_pages_pdf, make_pdf, make_pdf_bomb
from keel_processes import KEEL, KeelProcess, Servers
from test_ssrf import running_canary

TERMINAL = {"succeeded", "failed", "cancelled", "canceled", "dead_lettered", "expired"}
READ_WRITE = "tasks:read,tasks:write,tasks:approve,tools:net"


@dataclass
class Family:
    """What one family of attacks sent and found."""

    name: str
    requests: int = 0
    server_errors: int = 0
    lost: int = 0
    duplicates: int = 0
    leaks: int = 0
    canary_hits: int = 0
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)
    """Measured figures worth reporting (cycles, kills, statuses seen ...)."""
    defects: list[str] = field(default_factory=list)
    """Each fault seen: the request, the response, and why it is one."""

    @property
    def gates_met(self) -> bool:
        """The battery's gates: 0 server errors, 0 tasks lost, 0 duplicates, 0 leaks, 0 canary hits."""
        return not (self.server_errors or self.lost or self.duplicates or self.leaks or self.canary_hits)

    def saw(self, r: httpx.Response) -> httpx.Response:
        """Count ``r``; a 5xx is a server error, recorded with its request."""
        self.requests += 1
        if r.status_code >= 500:
            self.server_errors += 1
            self.defect(f"{r.request.method} {r.request.url.raw_path.decode()} -> {r.status_code}: {r.text[:300]}")
        return r

    def defect(self, text: str) -> None:
        if len(self.defects) < 50:  # a systematic fault repeats; fifty examples describe it
            self.defects.append(text)


@dataclass
class Keys:
    admin: str
    alpha: str
    alpha_id: str
    beta: str


@dataclass
class Target:
    """A running server and the keys the families use: tenant ``alpha`` (an admin and a normal key), ``beta``."""

    server: KeelProcess
    keys: Keys
    data_dir: Path

    def client(self, key: str | None = None, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {key or self.keys.alpha}"}, timeout=timeout
        )


def make_keys(data_dir: Path) -> Keys:
    data_dir.mkdir(parents=True, exist_ok=True)
    alpha = make_key(data_dir, "alpha", frozenset(READ_WRITE.split(",")))
    return Keys(
        admin=make_key(data_dir, "alpha", frozenset({"admin"})),
        alpha=alpha,
        alpha_id="",
        beta=make_key(data_dir, "beta", frozenset(READ_WRITE.split(","))),
    )


def start(servers: Servers, data_dir: Path, env: dict[str, str] | None = None) -> Target:
    keys = make_keys(data_dir)
    full = {"KEEL_EMBEDDING_MODEL": "hash:64", **(env or {})}
    server = servers.start(free_port(), data_dir, env=full, timeout=60)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys.admin}"}) as c:
        listed = c.get("/v1/keys")
        items = listed.json() if listed.status_code == 200 else []
        items = items.get("items", []) if isinstance(items, dict) else items
        keys.alpha_id = next((k["id"] for k in items if k.get("tenant") == "alpha"), "key_unknown")
    return Target(server=server, keys=keys, data_dir=data_dir)


def submit(c: httpx.Client, fam: Family, steps: int, step_seconds: float, **headers: str) -> str:
    r = fam.saw(c.post("/v1/tasks", json=diagnostic(steps, step_seconds), headers=headers))
    if r.status_code not in (200, 201, 202):
        raise AssertionError(f"submit refused: {r.status_code} {r.text}")
    return str(r.json()["id"])


def diagnostic(steps: int, step_seconds: float) -> dict[str, Any]:
    return {"workflow": "diagnostic", "input": {"steps": steps, "step_seconds": step_seconds}}


def wait_done(c: httpx.Client, fam: Family, task_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = fam.saw(c.get(f"/v1/tasks/{task_id}"))
        body: dict[str, Any] = r.json() if r.status_code == 200 else {"status": f"http {r.status_code}"}
        if body["status"] in TERMINAL or r.status_code != 200 or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def log_tracebacks(server: KeelProcess) -> list[str]:
    """Every logged exception in the server's whole log (keel's JSON lines carry ``exc_info``; anything else prints
    a plain traceback): a 500 the client never saw still counts. Each as its message and the traceback's end."""
    found: list[str] = []
    inside = False
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"exc_info"' in line:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                tail = " / ".join(str(record["exc_info"]).strip().splitlines()[-6:])
                message = str(record.get("message")).strip()
                if message == "Exception in ASGI application" and found and found[-1].endswith(tail[-1000:]):
                    continue  # uvicorn logs again what keel's handler logged and answered with a 500
                found.append(f"{message}: {tail}"[-1500:])
        elif line.startswith("Traceback"):
            inside = True
        elif inside and line and not line[0].isspace():
            found.append(line[:1500])
            inside = False
    return found


# -- Schemathesis ----------------------------------------------------------------------------------------------


def schemathesis(
    target: Target,
    report_dir: Path,
    *,
    max_examples: int,
    max_time: int,
    paths: str = "",
    labels: tuple[str, ...] = ("normal", "admin", "admin: key revocation"),
) -> Family:
    """Schemathesis with every check over the whole OpenAPI document the server serves: with a normal key, then with
    the operator's (``admin``, ``operator``, ``metrics``: every route), each a fresh key of its own tenant.
    The admin run leaves out revoking and rotating keys (its stateful phase would revoke the key it runs with, and
    every later request would be a 401); a short last run covers those two with another fresh key of the same
    scopes. Every failure it reports is listed; a 5xx also counts as a server error."""
    fam = Family("schemathesis")
    t0 = time.monotonic()
    st = str(Path(sys.executable).parent / "schemathesis")
    revocation = r"^/v1/keys/[^/]+/(revoke|rotate)$"
    for label in labels:
        scopes = READ_WRITE if label == "normal" else "admin,operator,metrics"
        key = make_key(target.data_dir, f"fuzz-{label.split(':')[0]}", frozenset(scopes.split(",")))
        budget = max_time if label != "admin: key revocation" else max(5, max_time // 10)
        report = report_dir / f"schemathesis-{label.split(':')[0]}-{len(fam.facts)}.json"
        cmd = [
            st, "run", f"{target.server.url}/openapi.json", "--checks", "all", "--max-examples", str(max_examples),
            "--max-time", str(budget), "--workers", "2", "--seed", "21", "--no-shrink", "--request-timeout", "10",
            "-H", f"Authorization: Bearer {key}", "--report", "json", "--report-json-path", str(report),
            "--suppress-health-check", "all",
        ]  # fmt: skip
        if label == "admin":
            cmd += ["--exclude-path-regex", revocation]
        elif label == "admin: key revocation":
            cmd += ["--include-path-regex", revocation]
        if paths:
            cmd += ["--include-path-regex", paths]
        out = subprocess.run(  # in report_dir, where it keeps its .schemathesis cache
            cmd, capture_output=True, text=True, timeout=max_time + 600, check=False, cwd=report_dir
        )
        report.with_suffix(".txt").write_text(out.stdout + out.stderr)
        if not report.exists():
            fam.defect(f"[{label}] schemathesis wrote no report: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            continue
        summary = json.loads(report.read_text())
        fam.requests += summary["test_cases"]["generated"]
        fam.facts[f"{label}: operations tested"] = summary["operations"]["tested"]
        fam.facts[f"{label}: test cases"] = summary["test_cases"]["generated"]
        fam.facts[f"{label}: phases"] = {k: v["status"] for k, v in summary["phases"].items()}
        fam.facts[f"{label}: failures"] = {
            f"{f['code']} {f['title']}": f"{f['count']} on {', '.join(f['operations'])}" for f in summary["failures"]
        }
        for f in summary["failures"]:
            if f["type"] == "ServerError" or "server error" in f["title"].lower():
                fam.server_errors += f["count"]
        for detail in _failure_details(out.stdout):
            fam.defect(f"[{label}] {detail}")
        # A normal key meets 401/403 on the admin operations; most operations refusing it means it was revoked.
        refused = re.search(r"Authentication failed: (\d+) operations", out.stdout)
        if refused and int(refused[1]) > summary["operations"]["tested"] // 2 and label != "admin: key revocation":
            fam.defect(f"[{label}] its key stopped working during the run: {out.stdout[-1500:]}")
        for error in summary["errors"]:
            fam.defect(f"[{label}] schemathesis error: {str(error)[:500]}")
    fam.seconds = time.monotonic() - t0
    return fam


def _failure_details(stdout: str) -> list[str]:
    """Each failure of the CLI's FAILURES section, squeezed to one line: the check, the response, the curl."""
    section = stdout.split(" FAILURES ", 1)[-1].split(" SUMMARY ", 1)[0] if " FAILURES " in stdout else ""
    out = []
    for block in re.split(r"\n_{5,} ", section)[1:]:
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        out.append(" | ".join(line for line in lines if not line.startswith(("st replay", "Reproduce with")))[:1200])
    return out


# -- BOLA ------------------------------------------------------------------------------------------------------


def bola(target: Target) -> Family:
    """Tenant alpha owns a task, a document, a session and keys; beta's key tries every route that names one of
    them. Anything but 401/403/404 with no data, or a listing that shows alpha's things, is a leak."""
    fam = Family("bola")
    t0 = time.monotonic()
    marker = "alpha-secret-7f3a"
    with target.client() as a, target.client(target.keys.beta) as b, target.client(target.keys.admin) as adm:
        done = submit(a, fam, 1, 0)
        running = submit(a, fam, 30, 0.2)
        wait_done(a, fam, done)
        doc = fam.saw(a.post("/v1/documents", files={"file": ("a.pdf", make_pdf([f"{marker} report"]))}))
        doc_id = str(doc.json().get("id") or doc.json().get("document_id")) if doc.status_code < 300 else "doc_x"
        chat = fam.saw(a.post("/v1/chat", json={"message": f"{marker} hello"}))
        session = chat.json().get("session", "ses_x") if chat.status_code < 300 else "ses_x"
        resp = fam.saw(a.post("/v1/responses", json={"input": f"{marker} hi", "model": "test", "store": True}))
        response_id = resp.json().get("id", "resp_x") if resp.status_code < 300 else "resp_x"
        probes: list[tuple[str, str, dict[str, Any] | None]] = [
            ("GET", f"/v1/tasks/{done}", None),
            ("GET", f"/v1/tasks/{done}/events", None),
            ("GET", f"/v1/tasks/{done}/approvals", None),
            ("POST", f"/v1/tasks/{running}/approvals/call_1", {"decision": "approve"}),
            ("GET", f"/v1/tasks/{done}/effects", None),
            ("POST", f"/v1/tasks/{running}/cancel", None),
            ("GET", f"/v1/documents/{doc_id}", None),
            ("DELETE", f"/v1/documents/{doc_id}", None),
            ("GET", f"/v1/sessions/{session}", None),
            ("DELETE", f"/v1/sessions/{session}", None),
            ("GET", f"/v1/responses/{response_id}", None),
            ("POST", f"/v1/responses/{response_id}/cancel", None),
            ("DELETE", f"/v1/responses/{response_id}", None),
            ("GET", "/v1/keys", None),
            ("POST", f"/v1/keys/{target.keys.alpha_id}/revoke", None),
            ("POST", f"/v1/keys/{target.keys.alpha_id}/rotate", {}),
            ("GET", "/v1/tenants/alpha/limits", None),
            ("PUT", "/v1/tenants/alpha/limits", {"max_running": 1}),
            ("DELETE", "/v1/tenants/alpha/limits", None),
        ]
        for method, path, body in probes:
            for headers in ({}, {"Last-Event-ID": "0"}) if path.endswith("/events") else ({},):
                r = fam.saw(b.request(method, path, json=body, headers=headers))
                if r.status_code not in (401, 403, 404) or marker in r.text:
                    fam.leaks += 1
                    fam.defect(f"beta {method} {path} -> {r.status_code}: {r.text[:200]}")
        for path, owned in (("/v1/tasks", done), ("/v1/documents", doc_id)):
            r = fam.saw(b.get(path))
            if owned in r.text or marker in r.text:
                fam.leaks += 1
                fam.defect(f"beta GET {path} lists alpha's {owned}")
        r = fam.saw(b.post("/v1/memory/search", json={"query": marker}))
        if r.status_code == 200 and marker in json.dumps(r.json().get("hits")):
            fam.leaks += 1
            fam.defect(f"beta's memory search finds alpha's text: {r.text[:200]}")
        # Nothing beta did changed alpha's things.
        for path in (f"/v1/tasks/{running}", f"/v1/documents/{doc_id}", f"/v1/sessions/{session}"):
            r = fam.saw(a.get(path))
            if r.status_code != 200 or (path.endswith(running) and r.json()["status"] == "cancelled"):
                fam.lost += 1
                fam.defect(f"after beta's attempts, alpha GET {path} -> {r.status_code} {r.text[:200]}")
        fam.saw(adm.get("/v1/keys"))
        # alpha's own admin (no `operator`) reads alpha's limits, and can neither set them nor read beta's.
        for method, path, body in (
            ("PUT", "/v1/tenants/alpha/limits", {"rate_per_s": 1e6}),
            ("DELETE", "/v1/tenants/alpha/limits", None),
            ("GET", "/v1/tenants/beta/limits", None),
            ("PUT", "/v1/tenants/beta/limits", {"rate_per_s": 0.001}),
            ("POST", "/v1/keys", {"scopes": ["operator"]}),
        ):
            r = fam.saw(adm.request(method, path, json=body))
            if r.status_code != 403:
                fam.leaks += 1
                fam.defect(f"alpha's admin {method} {path} -> {r.status_code}: {r.text[:200]}")
        fam.saw(a.post(f"/v1/tasks/{running}/cancel"))
    fam.facts["routes probed"] = len(probes)
    fam.seconds = time.monotonic() - t0
    return fam


# -- SSE cut and resume ----------------------------------------------------------------------------------------


def _frames(r: httpx.Response, limit: int) -> Iterator[tuple[int, str]]:
    frame: dict[str, str] = {}
    seen = 0
    for line in r.iter_lines():
        if line == "":
            if "id" in frame:
                yield int(frame["id"]), frame.get("event", "")
                seen += 1
                if seen >= limit or frame.get("event") == "end":
                    return
            frame = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            frame[name] = value


def sse(target: Target, cycles: int, workers: int = 4) -> Family:
    """Follow diagnostic tasks, cutting the stream after a random number of frames and resuming with Last-Event-ID
    (header or query) until ``end``: the ids read across all cuts must be 1..n with no gap and no repeat, and
    equal to a full replay of the log."""
    fam = Family("sse")
    t0 = time.monotonic()
    lock = threading.Lock()
    done_cycles = [0]
    rng = random.Random(21)

    def follow() -> None:
        with target.client() as c:
            while True:
                with lock:
                    if done_cycles[0] >= cycles:
                        return
                tid = submit(c, fam, 6, 0.1)
                ids: list[int] = []
                ended = False
                while not ended:
                    with lock:
                        cut_after = rng.randint(1, 12)
                    kwargs: dict[str, Any] = {}
                    if ids:
                        as_query = rng.random() < 0.3
                        kwargs = {"params": {"last_event_id": ids[-1]}} if as_query else {
                            "headers": {"Last-Event-ID": str(ids[-1])}}  # fmt: skip
                    with c.stream("GET", f"/v1/tasks/{tid}/events", **kwargs) as r:
                        fam.saw(r)
                        if r.status_code == 204:  # finished and fully read
                            break
                        if r.status_code != 200:
                            r.read()
                            fam.defect(f"resume of {tid} after {ids[-1:]} -> {r.status_code}: {r.text[:200]}")
                            break
                        for i, event in _frames(r, cut_after):
                            ids.append(i)
                            ended = ended or event == "end"
                    with lock:
                        done_cycles[0] += 1
                full = [i for i, _ in _frames(fam.saw(c.get(f"/v1/tasks/{tid}/events")), 10**6)]
                gaps = len(set(full) - set(ids))
                repeats = len(ids) - len(set(ids))
                if gaps or repeats or ids != full:
                    with lock:
                        fam.lost += gaps
                        fam.duplicates += repeats
                    fam.defect(f"task {tid}: read {ids} across cuts, log has {full}")

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(follow) for _ in range(workers)]:
            f.result()
    fam.facts["cut-and-resume cycles"] = done_cycles[0]
    fam.seconds = time.monotonic() - t0
    return fam


# -- idempotency races -----------------------------------------------------------------------------------------


def idempotency(target: Target, rounds: int, concurrency: int) -> Family:
    """``concurrency`` simultaneous POSTs with one Idempotency-Key (and one body) give one task; the same key with
    different bodies gives one task and refusals, never a second task."""
    fam = Family("idempotency")
    t0 = time.monotonic()
    with target.client() as c, ThreadPoolExecutor(concurrency) as pool:
        before = _task_count(c, fam)
        for n in range(rounds):
            key = f"race-{n}-{random.random()}"
            same = n % 2 == 0
            barrier = threading.Barrier(concurrency)

            def post(i: int, key: str = key, same: bool = same, barrier: threading.Barrier = barrier) -> httpx.Response:
                body = diagnostic(1, 0 if same else 0.001 * (i + 1))
                barrier.wait()
                return fam.saw(c.post("/v1/tasks", json=body, headers={"Idempotency-Key": key}))

            answers = list(pool.map(post, range(concurrency)))
            ids = {r.json()["id"] for r in answers if r.status_code < 300}
            statuses = Counter(r.status_code for r in answers)
            fam.facts.setdefault("statuses", Counter()).update(statuses)
            if len(ids) != 1:
                fam.duplicates += max(0, len(ids) - 1)
                fam.defect(f"key {key} ({'same' if same else 'different'} bodies): tasks {sorted(ids)}, {statuses}")
        after = _task_count(c, fam)
        if after - before != rounds:
            fam.duplicates += max(0, after - before - rounds)
            fam.defect(f"{rounds} keys made {after - before} tasks")
    fam.facts["statuses"] = dict(fam.facts.get("statuses", {}))
    fam.facts["rounds x concurrent posts"] = f"{rounds} x {concurrency}"
    fam.seconds = time.monotonic() - t0
    return fam


def _task_count(c: httpx.Client, fam: Family) -> int:
    count, cursor = 0, None
    while True:
        r = fam.saw(c.get("/v1/tasks", params={"limit": 200, **({"cursor": cursor} if cursor else {})}))
        if r.status_code != 200:
            fam.defect(f"GET /v1/tasks -> {r.status_code}: {r.text[:200]}")
            return count
        page = r.json()
        count += len(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return count


# -- hostile bodies and PDFs -----------------------------------------------------------------------------------

TASK = b'{"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}'


def hostile_bodies() -> list[tuple[str, str, bytes, str]]:
    """(name, path, body, content type): bodies an attacker or a broken client sends."""
    deep, J, T = 100_000, "application/json", "/v1/tasks"
    return [
        ("malformed JSON", T, b'{"workflow": "diagnostic", "input": ', J),
        ("empty body", T, b"", J),
        ("JSON null", T, b"null", J),
        ("JSON array", T, b"[]", J),
        ("invalid UTF-8", T, b'{"workflow": "\xff\xfe"}', J),
        ("BOM then JSON", T, b"\xef\xbb\xbf" + TASK + b"}", J),
        ("huge body (3 MB)", T, TASK + b', "metadata": {"x": "' + b"a" * 3_000_000 + b'"}}', J),
        ("lone surrogate in metadata", T, TASK + b', "metadata": {"x": "\\udc00"}}', J),
        ("lone surrogate in key", T, TASK + b', "metadata": {"\\ud800": 1}}', J),
        ("NaN", T, TASK + b', "metadata": {"x": NaN}}', J),
        ("Infinity", T, TASK + b', "metadata": {"x": Infinity}}', J),
        ("-Infinity", T, TASK + b', "metadata": {"x": -Infinity}}', J),
        ("1e999", T, TASK + b', "metadata": {"x": 1e999}}', J),
        ("huge integer", T, TASK + b', "metadata": {"x": ' + b"9" * 5000 + b"}}", J),
        ("deep arrays", T, b"[" * deep + b"]" * deep, J),
        ("deep objects", T, b'{"a":' * 20_000 + b"1" + b"}" * 20_000, J),
        ("deep metadata", T, TASK + b', "metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001, J),
        ("workflow is a number", T, b'{"workflow": 5, "input": {}}', J),
        ("input is a string", T, b'{"workflow": "diagnostic", "input": "x"}', J),
        ("steps is a bool", T, b'{"workflow": "diagnostic", "input": {"steps": true}}', J),
        ("unknown workflow", T, b'{"workflow": "../../etc/passwd", "input": {}}', J),
        ("text/plain task", T, TASK + b"}", "text/plain"),
        ("form body", T, b"workflow=diagnostic", "application/x-www-form-urlencoded"),
        ("duplicate keys", T, b'{"workflow": "nope", "workflow": "diagnostic", "input": {}}', J),
        ("chat: max_tokens true", "/v1/chat", b'{"message": "hi", "max_tokens": true}', J),
        ("chat: wait_s false", "/v1/chat", b'{"message": "hi", "wait_s": false}', J),
        ("chat: lone surrogate", "/v1/chat", b'{"message": "\\udc00"}', J),
        ("agent: lone surrogate", "/v1/agent", b'{"prompt": "\\udc00"}', J),
        ("agent: NaN", "/v1/agent", b'{"prompt": "hi", "max_steps": NaN}', J),
        (
            "reason: deep schema",
            "/v1/reason",
            b'{"prompt": "x", "schema": ' + b'{"items":' * 3000 + b"{}" + b"}" * 3001,
            J,
        ),
        ("documents: JSON url wrong type", "/v1/documents", b'{"url": 5}', J),
        ("documents: no content type", "/v1/documents", b"%PDF-1.4", ""),
        ("multipart without boundary", "/v1/documents", b"--x\r\n", "multipart/form-data"),
        (
            "multipart, broken",
            "/v1/documents",
            b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n',
            "multipart/form-data; boundary=b",
        ),
        ("memory search: query object", "/v1/memory/search", b'{"query": {"$ne": 1}}', J),
        ("function-call: tools a string", "/v1/function-call", b'{"prompt": "x", "tools": "fetch_url"}', J),
        ("OpenAI chat: messages null", "/v1/chat/completions", b'{"model": "test", "messages": null}', J),
        ("responses: input deep", "/v1/responses", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", J),
    ]


# What the issue asks to refuse although it is well-formed JSON: accepted, they are defects (not server errors).
MUST_REFUSE = {
    "lone surrogate",
    "NaN",
    "Infinity",
    "1e999",
    "huge integer",
    "is a bool",
    "max_tokens true",
    "wait_s false",
}


def hostile(target: Target, limit: int | None = None) -> Family:
    """Every hostile body: never a 5xx; a body the issue says to refuse must get a 4xx; a task that was accepted
    stays readable, and so does every page of the tenant's task list."""
    fam = Family("hostile bodies")
    t0 = time.monotonic()
    statuses: dict[str, int | str] = {}
    with target.client() as c:
        before = submit(c, fam, 1, 0)
        for name, path, body, ctype in hostile_bodies()[:limit]:
            headers = {"Content-Type": ctype} if ctype else {}
            try:
                with target.client() as fresh:  # a refused huge body leaves its connection unusable
                    r = fam.saw(fresh.post(path, content=body, headers=headers))
            except httpx.TransportError as exc:  # the server may refuse a huge body before reading it all
                fam.requests += 1
                statuses[name] = f"connection closed ({type(exc).__name__})"
                continue
            statuses[name] = r.status_code
            if r.status_code < 300 and any(word in name for word in MUST_REFUSE):
                fam.defect(f"{name}: POST {path} {body[:120]!r} accepted with {r.status_code}, should be 422")
            if r.status_code in (200, 201, 202) and path == "/v1/tasks":
                tid = r.json()["id"]
                read = fam.saw(c.get(f"/v1/tasks/{tid}"))
                if read.status_code != 200:
                    fam.lost += 1
                    fam.defect(f"{name}: accepted task {tid} is unreadable: GET -> {read.status_code}")
        for path in (f"/v1/tasks/{before}", "/v1/tasks"):
            r = fam.saw(c.get(path))
            if r.status_code != 200:
                fam.lost += 1
                fam.defect(f"after the hostile bodies, GET {path} -> {r.status_code}")
        for name, kwargs in (
            ("Last-Event-ID of 5000 digits", {"headers": {"Last-Event-ID": "9" * 5000}}),
            ("Last-Event-ID 2**63+1", {"headers": {"Last-Event-ID": "9223372036854775809"}}),
            ("last_event_id 2**63+1", {"params": {"last_event_id": "9223372036854775809"}}),
        ):
            with target.client() as fresh:
                try:
                    statuses[name] = fam.saw(fresh.get(f"/v1/tasks/{before}/events", **kwargs)).status_code
                except httpx.TransportError as exc:
                    fam.requests += 1
                    statuses[name] = f"connection closed ({type(exc).__name__})"
    fam.facts["statuses"] = statuses
    fam.seconds = time.monotonic() - t0
    return fam


def hostile_pdfs(target: Target, workdir: Path, limit: int | None = None) -> Family:
    """Encrypted, corrupt, bomb-like and huge PDFs, uploaded to /v1/documents: never a 5xx, and the server stays
    ready."""
    fam = Family("hostile PDFs")
    t0 = time.monotonic()
    good = make_pdf(["A short, honest report."])
    pdfs: list[tuple[str, bytes, dict[str, str]]] = [
        ("encrypted, no password", make_pdf(["secret"], password="pw"), {}),
        ("encrypted, wrong password", make_pdf(["secret"], password="pw"), {"password": "nope"}),
        ("encrypted, right password", make_pdf(["secret"], password="pw"), {"password": "pw"}),
        ("corrupt", corrupt_pdf(), {}),
        ("truncated", good[: len(good) // 2], {}),
        ("1 GiB text-stream bomb", make_pdf_bomb(workdir / "bomb.pdf").read_bytes(), {}),
        ("1 GiB image bomb", make_pdf_bomb(workdir / "ibomb.pdf", image=True).read_bytes(), {}),
        ("10,000 pages", make_many_pages_pdf(workdir / "many.pdf").read_bytes(), {}),
        ("not a PDF", b"MZ\x90\x00 this is an executable", {}),
        ("PDF header only", b"%PDF-1.7\n%%EOF", {}),
        ("zip bytes", b"PK\x03\x04" + b"\x00" * 200, {}),
    ]
    statuses: dict[str, str] = {}
    with target.client(timeout=120) as c:
        for name, data, form in pdfs[:limit]:
            s = time.monotonic()
            r = fam.saw(c.post("/v1/documents", files={"file": (f"{name}.pdf", data, "application/pdf")}, data=form))
            statuses[name] = f"{r.status_code} {_outcome(r)} ({time.monotonic() - s:.1f} s)"
            ready = fam.saw(c.get("/readyz"))
            if ready.status_code != 200:
                fam.defect(f"after {name}: /readyz -> {ready.status_code}")
    fam.facts["statuses"] = statuses
    fam.seconds = time.monotonic() - t0
    return fam


def _outcome(r: httpx.Response) -> str:
    """A document answer in a few words: a problem's type, or the document's status and the codes of its reasons."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:80]
    if r.status_code >= 400:
        return str(body.get("type", "")).rsplit(":", 1)[-1]
    codes = [str(w.get("code") or w.get("type")) for w in (body.get("errors") or []) + (body.get("warnings") or [])]
    return " ".join([str(body.get("status")), *codes])


# -- slow clients ----------------------------------------------------------------------------------------------


def slow_clients(target: Target, connections: int, wait_s: float) -> Family:
    """``connections`` sockets that send half their headers, and as many that send headers then a body one byte a
    second: after ``wait_s`` the server must have closed them, and served normal requests all along."""
    fam = Family("slow clients")
    t0 = time.monotonic()
    host, port = "127.0.0.1", int(target.server.url.rsplit(":", 1)[1])
    socks: list[tuple[str, socket.socket]] = []
    for i in range(connections):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(("half-sent headers", s))
        b = socket.create_connection((host, port), timeout=5)
        b.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + target.keys.alpha.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
        socks.append(("slow body", b))
        del i
    latencies: list[float] = []
    deadline = time.monotonic() + wait_s
    with httpx.Client(base_url=target.server.url, timeout=10) as c:
        while time.monotonic() < deadline:
            for kind, s in socks:
                if kind == "slow body":
                    with contextlib.suppress(OSError):
                        s.send(b" ")
            s0 = time.monotonic()
            try:
                fam.saw(c.get("/healthz"))
                latencies.append(time.monotonic() - s0)
            except httpx.TransportError as exc:
                fam.defect(f"GET /healthz failed while slow clients held connections: {exc!r}")
            time.sleep(1.0)
    still_open: Counter[str] = Counter()
    for kind, s in socks:
        s.setblocking(False)
        try:
            data = s.recv(65536)
            closed = data == b"" or data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.1 5")
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if not closed:
            still_open[kind] += 1
        s.close()
    fam.facts["connections"] = 2 * connections
    fam.facts[f"still open after {wait_s:g} s"] = dict(still_open) or 0
    fam.facts["healthz while held, max latency"] = f"{max(latencies, default=0):.3f} s"
    if still_open:
        fam.defect(f"{sum(still_open.values())} of {2 * connections} slow connections still open after {wait_s:g} s")
    fam.seconds = time.monotonic() - t0
    return fam


# -- kill -9 ---------------------------------------------------------------------------------------------------


def kill_loop(
    servers: Servers,
    data_dir: Path,
    *,
    short: int,
    long: int,
    kills: int,
    every_s: float,
    long_steps: int = 40,
    long_step_s: float = 0.5,
) -> Family:
    """``long`` tasks of ``long_steps`` steps of ``long_step_s`` (they outlast every kill) and ``short`` 3-step
    tasks, submitted in batches after each restart so that kills land on them too; the server is killed by SIGKILL
    and restarted ``kills`` times, ``every_s`` apart. Every accepted task must end succeeded, with each step's
    checkpoint completed exactly once; the long tasks must have been running at every kill and moved on between
    them."""
    fam = Family("kill -9")
    t0 = time.monotonic()
    env = {"KEEL_EMBEDDING_MODEL": "hash:64", "KEEL_WORKERS": "8"}
    target = start(servers, data_dir, env)
    mine = [target.server]
    port = int(target.server.url.rsplit(":", 1)[1])
    expected: dict[str, int] = {}
    batches = [short // (kills + 1) + (1 if i < short % (kills + 1) else 0) for i in range(kills + 1)]
    with target.client() as c:
        for _ in range(long):
            expected[submit(c, fam, long_steps, long_step_s)] = long_steps
    longs = list(expected)
    progress: dict[str, list[str]] = {tid: [] for tid in longs}
    hit: Counter[str] = Counter()  # tasks running when the server died
    lead_s = min(0.6, every_s / 2)  # each batch goes in just before a kill, so that the kill lands on some of it
    for n in range(kills + 1):
        if n < kills:
            time.sleep(every_s - lead_s)
        with target.client() as c:
            for _ in range(batches[n]):
                expected[submit(c, fam, 3, 0.3)] = 3
        if n == kills:
            break
        time.sleep(lead_s)
        with target.client() as c:  # where each task stood when its worker died
            running = c.get("/v1/tasks", params={"status": "running", "limit": 200}).json()["items"]
            by_id = {t["id"]: t for t in running}
            hit.update(by_id.keys())
            for tid in longs:
                view = by_id.get(tid) or c.get(f"/v1/tasks/{tid}").json()
                done = round(view["progress"] * long_steps)
                progress[tid].append(f"{done}" + ("" if view["status"] == "running" else f" ({view['status']})"))
        target.server.kill9()
        target.server = servers.start(port, data_dir, env=env, timeout=60)
        mine.append(target.server)
    with target.client() as c:
        outcome, attempts = _check_finished(c, fam, expected)
    for tid in longs:
        if hit[tid] < min(kills, 5):
            fam.defect(f"long task {tid} was running at only {hit[tid]} of {kills} kills: make it longer")
    fam.facts["tasks"] = f"{len(expected)}: {long} of {long_steps} x {long_step_s:g} s steps, {short} of 3 x 0.3 s"
    fam.facts["kills"] = f"{kills}, {every_s:g} s apart"
    fam.facts["tasks running at a kill"] = f"{len(hit)} tasks, {sum(hit.values())} task-kills"
    fam.facts["long tasks: steps done at each kill"] = {tid: " → ".join(p) for tid, p in progress.items()}
    fam.facts["long tasks: attempts"] = {tid: attempts.get(tid) for tid in longs}
    fam.facts["outcomes"] = dict(outcome)
    tracebacks = [line for server in mine for line in log_tracebacks(server)]
    fam.server_errors += len(tracebacks)
    for line in tracebacks[:10]:
        fam.defect(f"traceback in a kill-loop server's log: {line}")
    fam.seconds = time.monotonic() - t0
    return fam


def _check_finished(c: httpx.Client, fam: Family, expected: dict[str, int]) -> tuple[Counter[str], dict[str, int]]:
    """Wait for every task of ``expected`` (id → steps): each must succeed with all its steps, each completed once.
    Returns how the tasks ended and each one's lease count."""
    outcome: Counter[str] = Counter()
    attempts: dict[str, int] = {}
    for tid, steps in expected.items():
        body = wait_done(c, fam, tid, timeout=600)
        outcome[body["status"]] += 1
        attempts[tid] = body.get("attempts", -1)
        if body["status"] != "succeeded":
            fam.lost += 1
            err = (body.get("envelope") or {}).get("errors") or body.get("error")
            fam.defect(f"task {tid} ({steps} steps) ended {body['status']}: {str(err)[:300]}")
            continue
        completed = Counter(step for _, step in _events(c, fam, tid) if step)
        twice = sum(n - 1 for n in completed.values() if n > 1)
        if twice:
            fam.duplicates += twice
            fam.defect(f"task {tid}: steps completed more than once: {completed}")
        if len((body.get("envelope") or {}).get("result", {}).get("steps", [])) != steps:
            fam.lost += 1
            fam.defect(f"task {tid}: result holds the wrong steps: {str(body)[:300]}")
    return outcome, attempts


def _events(c: httpx.Client, fam: Family, tid: str) -> list[tuple[int, str]]:
    """(id, step name of each step_completed, else "") of a finished task's whole log."""
    out: list[tuple[int, str]] = []
    with c.stream("GET", f"/v1/tasks/{tid}/events") as r:
        fam.saw(r)
        frame: dict[str, str] = {}
        for line in r.iter_lines():
            if line == "":
                if "id" in frame:
                    step = json.loads(frame["data"]).get("step", "") if frame["event"] == "step_completed" else ""
                    out.append((int(frame["id"]), str(step)))
                    if frame["event"] == "end":
                        break
                frame = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                frame[name] = value
    return out


# -- SSRF ------------------------------------------------------------------------------------------------------


class _Redirector(http.server.BaseHTTPRequestHandler):
    """A "public" server (127.0.0.2, allowlisted) that redirects to ``?to=``: a redirect into loopback."""

    hits = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits += 1
        to = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("to", ["/"])[0]
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def ssrf_urls(port: int, redirector: str, limit: int | None = None) -> list[str]:
    """Internal addresses in every spelling, then each behind a redirect (``limit`` of each, for a short run)."""
    internal = [
        f"http://127.0.0.1:{port}/",
        f"http://localhost:{port}/",
        f"http://localhost.:{port}/",
        f"http://LOCALHOST:{port}/",
        f"http://[::1]:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
        f"http://[0:0:0:0:0:ffff:7f00:1]:{port}/",
        f"http://2130706433:{port}/",
        f"http://017700000001:{port}/",
        f"http://0x7f000001:{port}/",
        f"http://0x7f.0.0.1:{port}/",
        f"http://0177.0.0.1:{port}/",
        f"http://127.1:{port}/",
        f"http://127.0.1:{port}/",
        f"http://0.0.0.0:{port}/",
        f"http://0:{port}/",
        f"http://127.0.0.1.:{port}/",
        f"http://evil@127.0.0.1:{port}/",
        f"http://127.0.0.2@127.0.0.1:{port}/",
        f"http://127.0.0.1%2e:{port}/",
        f"http://ip6-localhost:{port}/",
        f"http://localhost.localdomain:{port}/",
        f"http://127.0.0.1.nip.io:{port}/",
        f"http://localtest.me:{port}/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://10.0.0.1/",
        "http://192.168.0.1/",
        f"https://127.0.0.1:{port}/",
        f"ftp://127.0.0.1:{port}/",
        "file:///etc/passwd",
        f"gopher://127.0.0.1:{port}/",
    ]
    redirects = [f"{redirector}/r?to={urllib.parse.quote(u, safe='')}" for u in internal if u.startswith("http")]
    return internal[:limit] + redirects[:limit]


def ssrf(servers: Servers, data_dir: Path, limit: int | None = None) -> Family:
    """Every internal URL, directly and through a redirect from an allowlisted "public" host, given to
    ``POST /v1/documents {"url"}`` and to the ``fetch_url`` tool (called by a scripted model through
    ``/v1/function-call``): the canary on loopback must count zero connections."""
    fam = Family("ssrf")
    t0 = time.monotonic()
    redirect_server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Redirector)
    threading.Thread(target=redirect_server.serve_forever, daemon=True).start()
    redirector = f"http://127.0.0.2:{redirect_server.server_address[1]}"
    _Redirector.hits = 0
    statuses: Counter[str] = Counter()
    with running_canary() as canary, FakeOpenAIServer() as llm:
        env = {
            "KEEL_DEFAULT_MODEL": f"openai-compatible:{llm.base_url}#gpt-4o-mini-2024-07-18",
            "OPENAI_COMPATIBLE_API_KEY": "sk-test",
            "KEEL_FETCH_ALLOW_HOSTS": "127.0.0.2",
        }
        target = start(servers, data_dir, env)
        urls = ssrf_urls(canary.port, redirector, limit)
        with target.client() as c:
            for url in urls:
                r = fam.saw(c.post("/v1/documents", json={"url": url}))
                statuses[f"documents {r.status_code}"] += 1
                llm.script(
                    Reply(
                        tool_calls=[ToolCallSpec(name="fetch_url", arguments={"url": url})], finish_reason="tool_calls"
                    )
                )
                r = fam.saw(
                    c.post("/v1/function-call", json={"prompt": "fetch", "execute": True, "tools": ["fetch_url"]})
                )
                call = (
                    ((r.json().get("envelope") or {}).get("result") or {}).get("calls", [{}])
                    if r.status_code == 200
                    else [{}]
                )
                statuses[f"fetch_url {r.status_code} ok={call[0].get('ok')}"] += 1
        fam.canary_hits = canary.hits
    redirect_server.shutdown()
    redirect_server.server_close()
    fam.facts["URLs"] = len(urls)
    fam.facts["attempts (documents + fetch_url)"] = 2 * len(urls)
    fam.facts["redirector hits (the allowlisted hop was reached)"] = _Redirector.hits
    fam.facts["statuses"] = dict(statuses)
    if fam.canary_hits:
        fam.defect(f"the canary counted {fam.canary_hits} connections")
    fam.seconds = time.monotonic() - t0
    return fam


# -- the whole battery -----------------------------------------------------------------------------------------


@dataclass
class Scale:
    """How big each family runs: the full battery (``bench/reliability.py``) or a few cases (the CI test)."""

    schemathesis_examples: int = 30
    schemathesis_max_time: int = 200
    schemathesis_paths: str = ""
    schemathesis_keys: tuple[str, ...] = ("normal", "admin", "admin: key revocation")
    sse_cycles: int = 200
    race_rounds: int = 10
    race_concurrency: int = 16
    hostile_limit: int | None = None
    pdf_limit: int | None = None
    slow_connections: int = 40
    header_timeout_s: float = 5.0
    """``KEEL_HTTP_HEADER_TIMEOUT_S`` of the server under test (the default is 10 s; shorter keeps the run short)."""
    body_timeout_s: float = 10.0
    """``KEEL_HTTP_BODY_TIMEOUT_S`` (default 60 s); the slow clients wait this long plus ``slow_margin_s``."""
    slow_margin_s: float = 3.0
    kill_short: int = 100
    kill_long: int = 4
    kill_count: int = 6
    kill_every_s: float = 5.0
    kill_long_steps: int = 40
    kill_long_step_s: float = 1.0
    """The issue's reproduction of defect 3: 40 steps of 1 s, killed 5 times about 5 s apart."""
    ssrf_limit: int | None = None
    families: tuple[str, ...] = (
        "bola", "sse", "idempotency", "hostile", "pdfs", "slow", "ssrf", "kill", "schemathesis"
    )  # fmt: skip


def run_battery(workdir: Path, scale: Scale, log: Callable[[str], None] = print) -> list[Family]:
    """Every family of ``scale`` against real servers under ``workdir``; all servers are gone when it returns."""
    servers = Servers(workdir)
    results: list[Family] = []
    try:
        timeouts = {
            "KEEL_HTTP_HEADER_TIMEOUT_S": str(scale.header_timeout_s),
            "KEEL_HTTP_BODY_TIMEOUT_S": str(scale.body_timeout_s),
        }
        main = start(servers, workdir / "main", timeouts)
        plan: dict[str, Callable[[], Family]] = {
            "bola": lambda: bola(main),
            "sse": lambda: sse(main, scale.sse_cycles),
            "idempotency": lambda: idempotency(main, scale.race_rounds, scale.race_concurrency),
            "hostile": lambda: hostile(main, scale.hostile_limit),
            "pdfs": lambda: hostile_pdfs(main, workdir, scale.pdf_limit),
            "slow": lambda: slow_clients(main, scale.slow_connections, scale.body_timeout_s + scale.slow_margin_s),
            "ssrf": lambda: ssrf(servers, workdir / "ssrf", scale.ssrf_limit),
            "kill": lambda: kill_loop(
                servers,
                workdir / "kill",
                short=scale.kill_short,
                long=scale.kill_long,
                kills=scale.kill_count,
                every_s=scale.kill_every_s,
                long_steps=scale.kill_long_steps,
                long_step_s=scale.kill_long_step_s,
            ),  # fmt: skip
            "schemathesis": lambda: schemathesis(
                main,
                workdir,
                max_examples=scale.schemathesis_examples,
                max_time=scale.schemathesis_max_time,
                paths=scale.schemathesis_paths,
                labels=scale.schemathesis_keys,
            ),  # fmt: skip
        }
        for name in scale.families:
            log(f"reliability: {name} ...")
            fam = plan[name]()
            verdict = "gates met" if fam.gates_met else "GATES NOT MET"
            log(f"reliability: {name}: {fam.requests} req, {fam.seconds:.0f} s, {verdict}, defects: {len(fam.defects)}")
            results.append(fam)
        tracebacks = log_tracebacks(main.server)
        if tracebacks:
            results.append(Family("server log", server_errors=len(tracebacks), defects=tracebacks[:20]))
    finally:
        servers.stop_all()
    return results


__all__ = ["KEEL", "Family", "Scale", "run_battery"]
