"""keel against a bare FastAPI + uvicorn floor, same client, same workloads, in one run; writes docs/benchmarks.md.

Run: ``.venv/bin/python bench/bench_peer.py`` (about 2 minutes on 2 cores; ``--repeats N`` for more).

Both servers run at once as subprocesses on loopback; every workload runs on one, then on the other, interleaved,
``REPEATS`` times (the order flips each repeat), and the tables give medians of the repeats and keel/floor ratios.
On a shared machine only the ratios mean much: both columns saw the same load at nearly the same time.

* keel: ``keel serve`` on a fresh data dir (SQLite, WAL, synchronous=FULL: every 202 waits for an fsync'd commit,
  every step is checkpointed, every token is a durable event), with the workloads of ``bench/peer_workflows.py``.
* the floor: one FastAPI app answering the same routes (``POST /v1/tasks``, ``GET /v1/tasks/{id}/events`` with
  ``Last-Event-ID``) from memory, the workloads as plain asyncio coroutines; it stores nothing and survives nothing.
* LangGraph's Agent Server (``langgraph dev``, in-memory runtime) is a third column if ``langgraph-cli[inmem]`` is
  found (``KEEL_BENCH_LANGGRAPH=/path/to/langgraph``, else ``langgraph`` on PATH, else ``langgraph_cli`` importable
  here, else the virtualenv below), with the same workloads as graphs (``bench/peer_langgraph/``). Install it apart
  from keel's dependencies (the versions the published figures used)::

    python3 -m venv ~/.cache/keel/langgraph-venv
    ~/.cache/keel/langgraph-venv/bin/pip install 'langgraph-cli[inmem]==0.4.40' langgraph-api==0.16.7 \\
        langgraph-runtime-inmem==0.36.7 langgraph==1.2.24

The client is httpx (one keep-alive connection per user) with httpx_sse; "done" is the ``end`` event on the stream
opened right after the 202 (on LangGraph, the run's joined stream closing after its last chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _doc import cpu_model, fsync_commit_ms, write_section
from bench_api import Server, create_key, keel_command, percentile, serve
from httpx_sse import ServerSentEvent, aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
START_MARK, END_MARK = "<!-- bench_peer:start -->", "<!-- bench_peer:end -->"

REPEATS = 3
SUBMIT_N = 300  # sequential POSTs at 1 client
DONE_N = 60  # sequential submit -> end at 1 client
DONE_C, DONE_C_N = 32, 640  # concurrent users, runs in all
CHAIN_STEPS, CHAIN_N = 20, 10
BURST_N, BURST_RUNS = 500, 5
FLOOD_N = 5000  # token events to one client, for the events/s figure
PACED_N, PACED_MS, PACED_RUNS = 200, 2.0, 5
FANOUT = {"branches": 4, "seconds": 1.0}
RESUME_N, RESUME_AT, RESUME_GAP_S = 300, 100, 0.25

NOOP = {"workflow": "peer_chain", "input": {"steps": 0}}

FLOOR_APP = '''
"""The floor: keel's routes answered from memory by plain asyncio, with sse_starlette as keel uses it."""
import asyncio
import itertools
import time
from typing import Any

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

app = FastAPI()
_ids = itertools.count()
_tasks: dict[str, "Run"] = {}


class SubmitTask(BaseModel):
    workflow: str = Field(min_length=1, max_length=100)
    input: dict[str, Any] = Field(default_factory=dict)


class Run:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = [("status", {"status": "queued"})]
        self.changed = asyncio.Event()

    def emit(self, type: str, data: dict[str, Any]) -> None:
        self.events.append((type, data))
        self.changed.set()


async def _noop(i: int) -> int:
    return i


async def execute(run: Run, body: SubmitTask) -> None:
    await asyncio.sleep(0)
    run.emit("status", {"status": "running"})
    inp = body.input
    if body.workflow == "peer_chain":
        for i in range(inp.get("steps", 0)):
            await _noop(i)
    elif body.workflow == "peer_tokens":
        for i in range(inp.get("n", 500)):
            await asyncio.sleep(inp.get("pace_ms", 0.0) / 1000)
            run.emit("token", {"i": i, "text": f"t{i} ", "t": time.time()})
    elif body.workflow == "peer_fanout":
        await asyncio.gather(*(asyncio.sleep(inp.get("seconds", 1.0)) for _ in range(inp.get("branches", 4))))
    run.emit("end", {"status": "succeeded"})


_running: set[asyncio.Task[None]] = set()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/tasks", status_code=202)
async def submit(body: SubmitTask, authorization: str = Header()) -> JSONResponse:
    task_id = f"tsk_{next(_ids):016x}"
    run = _tasks[task_id] = Run()
    job = asyncio.create_task(execute(run, body))
    _running.add(job)
    job.add_done_callback(_running.discard)
    base = f"/v1/tasks/{task_id}"
    links = {"self": base, "events": base + "/events", "cancel": base + "/cancel"}
    content = {"id": task_id, "status": "queued", "links": links, "estimated_duration_s": 0.0}
    return JSONResponse(content, status_code=202, headers={"Location": base})


@app.get("/v1/tasks/{task_id}/events")
async def events(task_id: str, authorization: str = Header(), last_event_id: str | None = Header(None)):
    run = _tasks[task_id]
    after = int(last_event_id or 0)

    async def frames():
        yield ServerSentEvent(comment="floor event stream", retry=2000)
        cursor = after
        while True:
            while cursor < len(run.events):
                type, data = run.events[cursor]
                cursor += 1
                yield ServerSentEvent(id=str(cursor), event=type, data=__import__("json").dumps(data))
                if type == "end":
                    return
            run.changed.clear()
            await run.changed.wait()

    return EventSourceResponse(frames(), ping=15, send_timeout=30)
'''


# -- the client: one code path for every server ---------------------------------------------------------------


@dataclass
class Received:
    id: str  # the SSE id: keel's and the floor's are the event's sequence number, LangGraph's its stream id
    type: str
    data: dict[str, Any]
    at: float
    wall: float  # time.time() on arrival, against a token's own ``t``


class KeelApi:
    """keel's routes, which the floor answers too: ``POST /v1/tasks`` (202), ``GET /v1/tasks/{id}/events``, whose
    last event is ``end``."""

    submit_path = "POST /v1/tasks"

    def request(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "/v1/tasks", body

    def handle(self, response: httpx.Response) -> str:
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/tasks answered {response.status_code}: {response.text[:300]}")
        return str(response.json()["id"])

    def events_path(self, handle: str) -> str:
        return f"/v1/tasks/{handle}/events"

    def event(self, sse: ServerSentEvent) -> str:
        return sse.event

    ends_with_close = False

    def run_span(self, wall: float, events: list[Received], t0: float) -> float:
        """One run's time, as the chain's per-step figure subtracts it: submit → done."""
        return wall


class LangGraphApi(KeelApi):
    """LangGraph's Agent Server: a background run on a fresh thread (``POST /threads/{id}/runs`` creates the thread
    with the run, one request as keel's submit is), and the run's joined stream
    (``GET /threads/{id}/runs/{run}/stream``), which resumes from ``Last-Event-ID`` because every run is created
    with ``stream_resumable`` and ends by closing after the run's last chunk (it has no ``end`` event)."""

    submit_path = "POST /threads/{id}/runs"

    def request(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        run = {
            "assistant_id": body["workflow"],  # the graph of the same name in bench/peer_langgraph/
            "input": body["input"],
            "if_not_exists": "create",
            "stream_mode": ["custom"],  # the tokens' channel (get_stream_writer); "done" is the stream's close
            "stream_resumable": True,  # keep the chunks so a client can resume, as keel's events are kept
            "durability": "sync",  # each step's checkpoint saved before the next step starts, as keel does
        }
        return f"/threads/{uuid.uuid4()}/runs", run

    def handle(self, response: httpx.Response) -> str:
        if response.status_code != 200:
            raise RuntimeError(f"{self.submit_path} answered {response.status_code}: {response.text[:300]}")
        run = response.json()
        return f"{run['thread_id']}/runs/{run['run_id']}"

    def events_path(self, handle: str) -> str:
        return f"/threads/{handle}/stream"

    def event(self, sse: ServerSentEvent) -> str:
        if sse.event == "error":
            raise RuntimeError(f"LangGraph run failed: {sse.data[:300]}")
        return "token" if sse.event == "custom" else sse.event

    ends_with_close = True

    def run_span(self, wall: float, events: list[Received], t0: float) -> float:
        """Run started → done. The first event (``metadata``) is sent when a worker takes the run, and the queue
        takes a pending run only at its next 0.5 s poll, so submit → done is a run's time plus a wait that swings
        by up to a poll (and by more than a 20-step chain takes): the difference of two walls measures the poll's
        phase, not the steps."""
        return events[-1].at - events[0].at


KEEL_API = KeelApi()


@dataclass(frozen=True)
class Target:
    """One server under test, the key the client sends it, and the API it speaks."""

    server: Server
    key: str
    api: KeelApi = KEEL_API


async def submit(client: httpx.AsyncClient, body: dict[str, Any], api: KeelApi = KEEL_API) -> str:
    path, json_body = api.request(body)
    return api.handle(await client.post(path, json=json_body))


async def stream(
    client: httpx.AsyncClient,
    handle: str,
    *,
    after: str = "",
    stop_after_tokens: int | None = None,
    api: KeelApi = KEEL_API,
) -> list[Received]:
    """The run's events after ``after`` up to ``end`` (or until ``stop_after_tokens`` tokens: then drop)."""
    headers = {"Last-Event-ID": after} if after else {}
    out: list[Received] = []
    tokens = 0
    async with aconnect_sse(client, "GET", api.events_path(handle), headers=headers) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            type_ = api.event(sse)
            if not sse.id:
                continue
            out.append(Received(sse.id, type_, json.loads(sse.data), time.perf_counter(), time.time()))
            tokens += type_ == "token"
            if type_ == "end" or (stop_after_tokens is not None and tokens >= stop_after_tokens):
                break
        else:
            if api.ends_with_close:  # the server closed the stream: the run is over
                out.append(Received("", "end", {}, time.perf_counter(), time.time()))
    return out


def client_for(target: Target) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=target.server.url,
        headers={"Authorization": f"Bearer {target.key}"},
        limits=httpx.Limits(max_connections=1),
        timeout=httpx.Timeout(30, read=120),
    )


# -- the workloads: each returns {figure: value} for one repeat on one server -----------------------------------


async def w_submit(target: Target) -> dict[str, float]:
    async with client_for(target) as client:
        for _ in range(30):
            await submit(client, NOOP, target.api)
        latencies = []
        for _ in range(SUBMIT_N):
            t0 = time.perf_counter()
            await submit(client, NOOP, target.api)
            latencies.append(time.perf_counter() - t0)
    latencies.sort()
    return {"submit_p50_ms": 1000 * percentile(latencies, 0.5), "submit_p99_ms": 1000 * percentile(latencies, 0.99)}


async def _run_to_end(
    client: httpx.AsyncClient, body: dict[str, Any], api: KeelApi
) -> tuple[float, list[Received], float]:
    t0 = time.perf_counter()
    events = await stream(client, await submit(client, body, api), api=api)
    if not events or events[-1].type != "end":
        raise RuntimeError(f"stream ended without `end`: {[e.type for e in events][-5:]}")
    return time.perf_counter() - t0, events, t0


async def w_done(target: Target) -> dict[str, float]:
    async with client_for(target) as client:
        for _ in range(5):
            await _run_to_end(client, NOOP, target.api)
        walls = []
        t0 = time.perf_counter()
        for _ in range(DONE_N):
            walls.append((await _run_to_end(client, NOOP, target.api))[0])
        rate1 = DONE_N / (time.perf_counter() - t0)
    walls.sort()
    return {"done_p50_ms": 1000 * percentile(walls, 0.5), "done_rps_1": rate1}


async def w_done_concurrent(target: Target) -> dict[str, float]:
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(target)) for _ in range(DONE_C)]
        remaining = DONE_C_N
        walls: list[float] = []

        async def user(client: httpx.AsyncClient, count: int | None = None) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                walls.append((await _run_to_end(client, NOOP, target.api))[0])

        remaining = DONE_C * 2  # warm-up: two runs each
        await asyncio.gather(*(user(c) for c in clients))
        walls.clear()
        remaining = DONE_C_N
        cpu0, t0 = target.server.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(user(c) for c in clients))
        elapsed, cpu = time.perf_counter() - t0, target.server.cpu_seconds() - cpu0
    walls.sort()
    return {
        "done_rps_32": DONE_C_N / elapsed,
        "done_p99_ms_32": 1000 * percentile(walls, 0.99),
        "done_cpu_ms_32": 1000 * cpu / DONE_C_N,
    }


async def w_chain(target: Target) -> dict[str, float]:
    body = {"workflow": "peer_chain", "input": {"steps": CHAIN_STEPS}}
    async with client_for(target) as client:
        await _run_to_end(client, body, target.api)
        noop = sorted([target.api.run_span(*await _run_to_end(client, NOOP, target.api)) for _ in range(CHAIN_N)])
        spans = sorted([target.api.run_span(*await _run_to_end(client, body, target.api)) for _ in range(CHAIN_N)])
    per_step = (statistics.median(spans) - statistics.median(noop)) / CHAIN_STEPS
    return {"chain_wall_ms": 1000 * statistics.median(spans), "chain_step_ms": 1000 * per_step}


def _tokens(events: list[Received]) -> list[Received]:
    return [e for e in events if e.type == "token"]


async def w_burst(target: Target) -> dict[str, float]:
    body = {"workflow": "peer_tokens", "input": {"n": BURST_N, "pace_ms": 0}}
    flood = {"workflow": "peer_tokens", "input": {"n": FLOOD_N, "pace_ms": 0}}
    async with client_for(target) as client:
        firsts, distinct = [], []
        for _ in range(BURST_RUNS):
            _, events, t0 = await _run_to_end(client, body, target.api)
            tokens = _tokens(events)
            firsts.append(tokens[0].at - t0)
            distinct.append(len({e.id for e in tokens}))
        _, events, _ = await _run_to_end(client, flood, target.api)
        tokens = _tokens(events)
        if len(tokens) != FLOOD_N or [e.data["i"] for e in tokens] != list(range(FLOOD_N)):
            raise RuntimeError(f"{target.server.name}: the flood lost or reordered tokens")
        rate = (len(tokens) - 1) / max(tokens[-1].at - tokens[0].at, 1e-9)
    return {
        "burst_first_ms": 1000 * statistics.median(firsts),
        "burst_distinct": min(distinct),
        "token_events_per_s": rate,
    }


async def w_paced(target: Target) -> dict[str, float]:
    body = {"workflow": "peer_tokens", "input": {"n": PACED_N, "pace_ms": PACED_MS}}
    async with client_for(target) as client:
        firsts, delays, gaps = [], [], []
        for _ in range(PACED_RUNS):
            _, events, t0 = await _run_to_end(client, body, target.api)
            tokens = _tokens(events)
            firsts.append(tokens[0].at - t0)
            delays.append(tokens[0].wall - tokens[0].data["t"])
            # How long the slowest token took from its emission to the client (a commit, when durable).
            gaps.append(max(e.wall - e.data["t"] for e in tokens))
    return {
        "paced_first_ms": 1000 * statistics.median(firsts),
        "paced_first_delay_ms": 1000 * statistics.median(delays),
        "paced_max_lag_ms": 1000 * statistics.median(gaps),
    }


async def w_fanout(target: Target) -> dict[str, float]:
    body = {"workflow": "peer_fanout", "input": FANOUT}
    async with client_for(target) as client:
        walls = [(await _run_to_end(client, body, target.api))[0] for _ in range(2)]
    return {"fanout_wall_s": statistics.median(walls)}


async def w_resume(target: Target) -> dict[str, float]:
    body = {"workflow": "peer_tokens", "input": {"n": RESUME_N, "pace_ms": PACED_MS}}
    async with client_for(target) as client:
        handle = await submit(client, body, target.api)
        first = await stream(client, handle, stop_after_tokens=RESUME_AT, api=target.api)
    await asyncio.sleep(RESUME_GAP_S)  # the connection is closed: the client is gone for the gap
    async with client_for(target) as client:
        rest = await stream(client, handle, after=first[-1].id, api=target.api)
    seen = [e.data["i"] for e in _tokens(first + rest)]
    return {
        "resume_lost": RESUME_N - len(set(seen)),
        "resume_duplicated": len(seen) - len(set(seen)),
        "resume_ids_distinct": float(len({e.id for e in first + rest}) == len(first + rest)),
    }


WORKLOADS: list[tuple[str, Callable[[Target], Awaitable[dict[str, float]]]]] = [
    ("submit", w_submit),
    ("submit → done", w_done),
    (f"submit → done, {DONE_C} clients", w_done_concurrent),
    (f"{CHAIN_STEPS}-step chain", w_chain),
    (f"{BURST_N}-token burst", w_burst),
    (f"stream paced at {PACED_MS:g} ms", w_paced),
    ("4 × 1 s fan-out", w_fanout),
    ("resume after a gap", w_resume),
]


# -- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    figures: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # server -> figure -> repeats
    failures: dict[str, dict[str, str]] = field(default_factory=dict)  # server -> workload -> why it failed

    def add(self, server: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.figures.setdefault(server, {}).setdefault(name, []).append(value)

    def fail(self, server: str, workload: str, why: str) -> None:
        """``workload`` is its short name (``SHORT``); the first failure of it is the one kept."""
        self.failures.setdefault(server, {}).setdefault(workload, why)

    def median(self, server: str, name: str) -> float | None:
        values = self.figures.get(server, {}).get(name)
        return statistics.median(values) if values else None


def say(message: str) -> None:
    print(f"[bench_peer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


SHORT = ["submit", "done", "done32", "chain", "burst", "paced", "fanout", "resume"]  # --only's names, in order


async def drive(targets: list[Target], repeats: int, run: Run, probe_dir: Path, only: set[str] | None = None) -> None:
    chosen = [(short, *w) for short, w in zip(SHORT, WORKLOADS, strict=True) if only is None or short in only]
    for rep in range(repeats):
        shift = rep % len(targets)  # with two servers, the order flips each repeat
        order = targets[shift:] + targets[:shift]
        for short, label, workload in chosen:
            run.add("disk", {"fsync_commit_ms": fsync_commit_ms(probe_dir)})
            for target in order:
                say(f"repeat {rep + 1}/{repeats}: {label} on {target.server.name}")
                if target.server.name != LANGGRAPH:
                    run.add(target.server.name, await workload(target))
                    continue
                try:  # the peer failing a workload is a finding for the table, not a reason to lose the run
                    run.add(LANGGRAPH, await workload(target))
                except (RuntimeError, KeyError, ValueError, httpx.HTTPError) as exc:
                    say(f"LangGraph failed {label}: {exc!r}")
                    run.fail(LANGGRAPH, short, f"{type(exc).__name__}: {exc}"[:300])


# -- LangGraph's dev server, when it is installed ---------------------------------------------------------------

LANGGRAPH = "LangGraph"
LANGGRAPH_VENV = "~/.cache/keel/langgraph-venv"
# The versions the published figures used; a newer langgraph-cli[inmem] works too (the Method section names what ran).
LANGGRAPH_PINS = (
    "'langgraph-cli[inmem]==0.4.40' langgraph-api==0.16.7 langgraph-runtime-inmem==0.36.7 langgraph==1.2.24"
)
LANGGRAPH_HINT = f"python3 -m venv {LANGGRAPH_VENV} && {LANGGRAPH_VENV}/bin/pip install {LANGGRAPH_PINS}"
# `langgraph dev --help` says 10 jobs at once is the default, but the CLI passes 1 when the flag is absent
# (langgraph_api.cli.run_server), which would run the 32 clients' runs one at a time. 10 is the Agent Server's
# own default (N_JOBS_PER_WORKER); keel runs with its default KEEL_WORKERS=4.
LANGGRAPH_JOBS = 10


def langgraph_command() -> list[str] | None:
    """The ``langgraph`` command: ``KEEL_BENCH_LANGGRAPH``, else on PATH, else ``langgraph_cli`` in this Python, else
    in ``LANGGRAPH_VENV``."""
    if configured := os.environ.get("KEEL_BENCH_LANGGRAPH"):
        path = Path(configured).expanduser()
        if not path.is_file():
            raise SystemExit(f"KEEL_BENCH_LANGGRAPH={configured}: no such file (want the `langgraph` command)")
        return [str(path)]
    if found := shutil.which("langgraph"):
        return [found]
    if importlib.util.find_spec("langgraph_cli") is not None:
        return [sys.executable, "-m", "langgraph_cli"]
    if (installed := Path(LANGGRAPH_VENV).expanduser() / "bin" / "langgraph").is_file():  # where the hint installs
        return [str(installed)]
    return None


def serve_langgraph(command: list[str], workdir: Path) -> contextlib.AbstractContextManager[Server]:
    """``langgraph dev`` (in-memory runtime) on the graphs of ``bench/peer_langgraph/``, in a copy of that folder:
    the dev server reads the config's paths from its working directory and keeps its state in ``.langgraph_api``
    there, which must not land in the repository."""
    home = workdir / "langgraph"
    shutil.copytree(BENCH / "peer_langgraph", home, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [*command, "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port", "{port}"]
    cmd += ["--config", "langgraph.json", "--n-jobs-per-worker", str(LANGGRAPH_JOBS)]
    cmd += ["--server-log-level", "warning"]
    env = {"LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGSMITH_TRACING": "false", "PYTHONPATH": ""}
    return serve(LANGGRAPH, cmd, workdir, "/ok", env, cwd=home, ready_s=180)


def langgraph_versions(command: list[str], server: Server) -> str:
    """The CLI's version (``langgraph --version``) and the server's own (``GET /info``), for the Method section."""
    cli = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    info = httpx.get(server.url + "/info", timeout=10).json()
    return (
        f"langgraph-cli {cli.rsplit(' ', 1)[-1] or '?'}, langgraph-api {info.get('version', '?')}, "
        f"langgraph {info.get('langgraph_py_version', '?')}"
    )


def keel_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
    return {"KEEL_WORKFLOWS": "peer_workflows:WORKFLOWS", "PYTHONPATH": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md")
    parser.add_argument(
        "--only", help=f"comma-separated workloads ({', '.join(SHORT)}); implies --no-write", default=None
    )
    parser.add_argument(
        "--no-langgraph", action="store_true", help="keel and the floor only, even where LangGraph is installed"
    )
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := only - set(SHORT)):
        parser.error(f"unknown workloads {sorted(unknown)}: choose from {', '.join(SHORT)}")
    lg_command = None if args.no_langgraph else langgraph_command()
    if lg_command is None and not args.no_langgraph:
        say(f"LangGraph's dev server is not installed: two columns only. For a third: {LANGGRAPH_HINT}")
    lg_versions: str | None = None
    started = time.monotonic()
    run = Run()
    with tempfile.TemporaryDirectory(prefix="keel-peer-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        data_dir = workdir / "keel-data"
        env = keel_env()
        key = create_key(data_dir)
        cmd = [keel_command("keel"), "serve", "--port", "{port}", "--data-dir", str(data_dir)]
        keel = stack.enter_context(serve("keel", [*cmd, "--log-level", "warning"], workdir, "/readyz", env))
        (workdir / "floor_app.py").write_text(FLOOR_APP)
        floor_cmd = [sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir", str(workdir)]
        floor_cmd += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
        floor = stack.enter_context(serve("floor", floor_cmd, workdir, "/healthz"))
        targets = [Target(keel, key), Target(floor, "floor")]
        if lg_command is not None:
            try:
                langgraph = stack.enter_context(serve_langgraph(lg_command, workdir))
            except RuntimeError as exc:  # e.g. langgraph-cli without its [inmem] extra: keel and the floor still run
                say(f"LangGraph's dev server did not start, two columns only ({LANGGRAPH_HINT}):\n{exc}")
            else:
                lg_versions = langgraph_versions(lg_command, langgraph)
                say(f"LangGraph's dev server is the third column ({lg_versions})")
                targets.insert(1, Target(langgraph, "langgraph", LangGraphApi()))
        import uvloop

        uvloop.run(drive(targets, args.repeats, run, workdir, only))
    elapsed = time.monotonic() - started
    say(f"done in {elapsed:.0f} s")
    section = render(run, args.repeats, elapsed, lg_versions)
    print(section)
    if not args.no_write and only is None:
        write_section(section, START_MARK, END_MARK)


# -- the report -------------------------------------------------------------------------------------------------

# figure, label, unit, format, lower is better, goal (text, test on keel's value and the ratio) or None
Goal = tuple[str, Callable[[float, float], bool]] | None
FIGURES: list[tuple[str, str, str, bool, Goal]] = [
    (
        "submit_p50_ms",
        "`POST /v1/tasks` p50, 1 client",
        "ms",
        True,
        ("≤ 2× the floor (1.5 ms on the issue's machine)", lambda k, r: r <= 2.0),
    ),
    ("submit_p99_ms", "`POST /v1/tasks` p99, 1 client", "ms", True, None),
    ("done_p50_ms", "no-op run, submit → done, p50", "ms", True, None),
    ("done_rps_1", "completed no-op runs/s, 1 client", "/s", False, None),
    (
        "done_rps_32",
        f"completed no-op runs/s, {DONE_C} clients",
        "/s",
        False,
        ("≥ 0.6× the floor", lambda k, r: r >= 0.6),
    ),
    (
        "done_p99_ms_32",
        f"submit → done p99, {DONE_C} clients",
        "ms",
        True,
        ("< 50 ms", lambda k, r: k < 50),
    ),
    ("done_cpu_ms_32", f"server CPU per completed no-op run, {DONE_C} clients", "ms", True, None),
    ("chain_step_ms", f"per step, {CHAIN_STEPS}-step chain", "ms", True, None),
    ("burst_first_ms", f"submit → first token, {BURST_N}-token burst", "ms", True, None),
    ("burst_distinct", f"distinct event ids in a {BURST_N}-token burst", "", False, None),
    (
        "token_events_per_s",
        f"token events/s to one client ({FLOOD_N:,} tokens)",
        "/s",
        False,
        ("≥ 20,000/s", lambda k, r: k >= 20_000),
    ),
    (
        "paced_first_ms",
        f"submit → first token, stream paced at {PACED_MS:g} ms",
        "ms",
        True,
        None,
    ),
    (
        "paced_first_delay_ms",
        f"first token, emitted → at the client, stream paced at {PACED_MS:g} ms",
        "ms",
        True,
        ("≤ 5 ms", lambda k, r: k <= 5),
    ),
    ("paced_max_lag_ms", f"slowest token, emitted → at the client, paced at {PACED_MS:g} ms", "ms", True, None),
    ("fanout_wall_s", "4 × 1 s fan-out, wall", "s", True, None),
    ("resume_lost", f"resume after a {RESUME_GAP_S * 1000:.0f} ms gap: tokens lost", "", True, None),
    ("resume_duplicated", f"resume after a {RESUME_GAP_S * 1000:.0f} ms gap: tokens duplicated", "", True, None),
]


NO_RATIO = {"chain_step_ms"}  # the floor's step is an awaited no-op: a ratio to it says nothing


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "/s" or value >= 100:
        return f"{value:,.0f}{'' if unit in ('/s', '') else ' ' + unit}"
    if unit == "":
        return f"{value:g}"
    return f"{value:.2f} {unit}" if unit == "ms" else f"{value:.3f} {unit}"


def workload_of(figure: str) -> str:
    """The short name of the workload that measures ``figure`` (its name starts with the workload's)."""
    prefixes = {"done_rps_32": "done32", "done_p99_ms_32": "done32", "done_cpu_ms_32": "done32"}
    prefixes["token_events"] = "burst"
    for prefix, short in prefixes.items():
        if figure.startswith(prefix):
            return short
    return figure.split("_", 1)[0]


def langgraph_cell(run: Run, name: str, unit: str, notes: list[str]) -> str:
    """LangGraph's median, or "—" with a footnote that says why there is none."""
    value = run.median(LANGGRAPH, name)
    if value is not None or run.median("keel", name) is None:  # no keel figure either: `--only` left it out
        return fmt(value, unit)
    why = run.failures.get(LANGGRAPH, {}).get(workload_of(name), "no figure")
    if why not in notes:
        notes.append(why)
    return f"—[^lg{notes.index(why) + 1}]"


def render(run: Run, repeats: int, elapsed: float, langgraph: str | None) -> str:
    """The section for docs/benchmarks.md; ``langgraph``: its versions, if LangGraph was the third column."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    notes: list[str] = []
    for name, label, unit, _, goal in FIGURES:
        k, f = run.median("keel", name), run.median("floor", name)
        ratio = k / f if k is not None and f is not None and f > 0 and name not in NO_RATIO else None
        verdict = ""
        if goal is not None and k is not None:
            met = goal[1](k, ratio if ratio is not None else float("nan"))
            verdict = f"{goal[0]}: {'met' if met else '**missed**'}"
        spread = run.figures.get("keel", {}).get(name, [])
        keel_cell = fmt(k, unit) + (f" ({fmt(min(spread), unit)}–{fmt(max(spread), unit)})" if len(spread) > 1 else "")
        floor_cell = fmt(f, unit) if name not in NO_RATIO else f"{fmt(f, unit)} (nothing to checkpoint)"
        row = [label, keel_cell, floor_cell, f"{ratio:.2f}×" if ratio is not None else "—", verdict]
        if langgraph is not None:
            row.insert(2, langgraph_cell(run, name, unit, notes))
        rows.append(row)
    if langgraph is None:
        lines = ["| figure | keel (min–max) | floor | keel/floor | goal |", "|---|---|---|---|---|"]
    else:
        lines = ["| figure | keel (min–max) | LangGraph | floor | keel/floor | goal |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if notes:
        lines += ["", *(f"[^lg{i}]: LangGraph: {why}" for i, why in enumerate(notes, 1))]
    disk = run.figures.get("disk", {}).get("fsync_commit_ms", [])
    if disk:
        lines += [
            "",
            f"A bare fsync'd SQLite commit of one row on the same disk, measured before each workload, took "
            f"{statistics.median(disk):.2f} ms (median; {min(disk):.2f}–{max(disk):.2f} ms): every keel figure "
            "that waits for durability pays at least that, and the floor never does.",
        ]
    if langgraph is None:
        order = f"on one server, then on the other; {repeats} repeats, the order flipped"
    else:
        order = f"on each of the three servers in turn; {repeats} repeats, the order rotated"
    method = textwrap.dedent(
        f"""\
        - Both servers run at once on loopback with uvicorn's defaults (uvloop, httptools, one process,
          `--log-level warning`): keel as `keel serve --data-dir <fresh temp dir>` with its default settings
          (SQLite WAL + synchronous=FULL, `KEEL_WORKERS` 4) and `KEEL_WORKFLOWS=peer_workflows:WORKFLOWS`
          (`bench/peer_workflows.py`); the floor as one FastAPI app (in this script) answering `POST /v1/tasks` and
          `GET /v1/tasks/{{id}}/events` (sse_starlette, `Last-Event-ID`) from memory, running the same workloads as
          plain coroutines. keel's key comes from `keel keys create`; the floor only requires the header.
        - Every workload runs {order} each repeat;
          each cell is the median of the repeats (keel's min–max beside it). Ratios are of those medians.
        - Client: httpx on uvloop in this process, one keep-alive connection per user, httpx_sse for streams.
          "Done" is the `end` event on the stream opened right after the 202.
        - submit: {SUBMIT_N} sequential `POST /v1/tasks` of a no-op run (`peer_chain`, steps=0) after 30 warm-ups.
          submit → done: {DONE_N} sequential no-op runs; with {DONE_C} clients, {DONE_C_N} runs after 2 warm-ups
          each; server CPU per run is the user + system time of the server's processes (/proc) over those runs,
          divided by their number. {CHAIN_STEPS}-step chain: per step = (median wall of {CHAIN_N} chains − median
          wall of {CHAIN_N} no-op runs) / {CHAIN_STEPS}.
        - Tokens (`peer_tokens`): one durable step emitting `token` events with `ctx.emit_nowait`, the path a model
          stream takes, yielding to the loop between tokens. Burst: {BURST_N} tokens, {BURST_RUNS} runs; events/s:
          one run of {FLOOD_N:,} tokens, (tokens − 1) / (last − first arrival), checked complete and in order.
          Paced: {PACED_N} tokens {PACED_MS:g} ms apart, {PACED_RUNS} runs; "emitted → at the client" compares the
          wall clock the token carries (stamped as it is emitted) with the client's on arrival (same machine).
        - Fan-out: `ctx.map` of {FANOUT["branches"]} × {FANOUT["seconds"]:g} s sleeps, 2 runs. Resume:
          {RESUME_N} tokens {PACED_MS:g} ms apart; the client drops the connection after {RESUME_AT} tokens,
          waits {RESUME_GAP_S * 1000:.0f} ms and reconnects with `Last-Event-ID`; lost and duplicated are counted by
          the tokens' own index."""
    )
    if langgraph is None:
        lg = "`langgraph-cli[inmem]` is not installed here, so there is no LangGraph column."
    else:
        lg = f"LangGraph's Agent Server (`langgraph dev`: {langgraph}) is the third column."
        method += "\n" + textwrap.dedent(
            f"""\
            - LangGraph runs at the same time ({langgraph}; telemetry off) from its own virtualenv
              (`{LANGGRAPH_VENV}`, installed with `pip install {LANGGRAPH_PINS}`), as
              `langgraph dev --no-browser --no-reload --n-jobs-per-worker {LANGGRAPH_JOBS} --server-log-level warning`
              in a copy of `bench/peer_langgraph/`. Its in-memory runtime keeps runs, checkpoints and stream chunks
              in memory and pickles them to disk every 10 s: like the floor, it makes nothing durable per request.
              `--n-jobs-per-worker {LANGGRAPH_JOBS}` is the Agent Server's own default; `langgraph dev` without it
              runs one run at a time.
            - LangGraph's workloads are graphs (`bench/peer_langgraph/peer_graphs.py`) of the same names, inputs and
              shapes: the chain is `steps` nodes in sequence (each a superstep LangGraph checkpoints; `durability=sync`
              saves it before the next starts, as keel does); tokens come from one node through
              `get_stream_writer` (stream mode `custom`), each carrying its index and emission wall clock; the fan-out
              is {FANOUT["branches"]} `Send`s to a node that sleeps {FANOUT["seconds"]:g} s.
            - LangGraph's submit is `POST /threads/{{id}}/runs` (a background run on a fresh thread id,
              `if_not_exists=create`, `stream_resumable=true`), answered 200; "done" is that run's joined stream
              (`GET /threads/{{id}}/runs/{{run}}/stream`) closing after its last chunk, as it has no `end` event; the
              resume sends the last token's stream id as `Last-Event-ID`. Its queue looks for pending runs every
              0.5 s when idle (langgraph-runtime-inmem's `Runs.next`): every LangGraph figure measured from the
              submit includes that wait, as a user sees it. Its per step alone is measured from the run's start (its
              first event, `metadata`, sent when a worker takes the run) to done, because that wait swings by more
              than a {CHAIN_STEPS}-step chain takes."""
        )
    parts = [
        START_MARK,
        "## keel against the floor (`bench/bench_peer.py`)",
        "",
        f"Generated by `.venv/bin/python bench/bench_peer.py` on {now} in {elapsed:.0f} s. {lg}",
        "",
        f"**Machine:** nproc={os.cpu_count()}, {cpu_model()}; Python {platform.python_version()} on "
        f"{platform.system()} {platform.release()}. Shared with other work while it ran: read the ratios.",
        "",
        *lines,
        "",
        "### Method",
        "",
        method,
        END_MARK,
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
