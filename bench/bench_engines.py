"""Benchmark: the embedded engine against Temporal, on one Postgres (started by ``scripts/``).

Run: ``.venv/bin/python bench/bench_engines.py`` (a few minutes; ``--tasks N``, ``--only throughput``, ``--no-doc``).

1. **Throughput**: 1 API replica and 1 or 2 ``keel worker`` processes (Redis for fan-out), on each engine, in
   interleaved rounds. N tasks of each workload (a no-op task, and the built-in ``diagnostic``: 3 durable no-op
   steps) are submitted through the API, and the queue drains; tasks/s runs from the first submission to the last
   finish. Each task's phases come from keel's time stamps and, on Temporal, its workflow's history.
2. **Per-step overhead**: in one process, a task of 20 no-op steps on each engine, against a plain loop of 20 awaited
   no-op coroutines run alongside. The per-step figure is the task's run time over 20.

``--per-step`` runs only a third measure, a step on Postgres against SQLite (issue 20): the embedded engine on a
*durable* Postgres (fsync and ``synchronous_commit`` on, unlike the tests' throwaway server) and on a SQLite file,
alternately, a fresh database each round, for ``peer_chain`` (steps that only checkpoint) and ``diagnostic``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from temporalio import workflow

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
sys.path.insert(0, str(TESTS))

from _doc import cpu_model, fsync_commit_ms, write_section  # noqa: E402

from scaleout import Cluster, cluster, fresh_database, service_url, stop_services  # noqa: E402

START, END = "<!-- bench_engines:start -->", "<!-- bench_engines:end -->"


WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "no-op": ("peer_chain", {"steps": 0}),
    "diagnostic": ("diagnostic", {"steps": 3, "step_seconds": 0}),
}
"""The throughput workloads: a true no-op task (leased, run, ended: ``peer_chain`` with no step), and ``diagnostic``
(3 durable no-op steps, each with 4 durable tokens, a partial result and progress)."""


@dataclass
class Drain:
    """One drain of N tasks of one workload."""

    rate: float
    """Tasks/s, from the first submission to the last task's end."""
    latency_ms: float
    """Submission to envelope stored, the median task."""
    phases: dict[str, float]
    """Where a task's time went, each phase's median in ms (see :func:`_phases`)."""
    cpu_ms: dict[str, float]
    """CPU time per task of each process group (see :func:`_cpu`) while the drain ran, and the machine's busy
    share of its cores (``machine busy %``: every process on it, other users' too)."""


def throughput(engine: str, workers: int, tasks: int, workloads: list[str]) -> dict[str, Drain]:
    """Drain ``tasks`` tasks of each workload, one workload after the other, through 1 API replica and ``workers``
    ``keel worker`` processes."""
    env = {
        "KEEL_WORKFLOWS": "effect_tools:WORKFLOWS,peer_workflows:WORKFLOWS",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), str(BENCH), os.environ.get("PYTHONPATH", "")) if p),
    }
    out: dict[str, Drain] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        cluster(Path(tmp), apis=1, workers=workers, sink_url="http://127.0.0.1:9", engine=engine, extra_env=env) as c,
        httpx.Client(base_url=c.apis[0].url or "", headers={"Authorization": f"Bearer {c.key}"}, timeout=30) as client,
    ):
        time.sleep(2.0)  # the workers connect and start polling
        for name in workloads:
            workflow, inp = WORKLOADS[name]
            cpu = _cpu(c)
            started = time.monotonic()
            ids = [
                client.post("/v1/tasks", json={"workflow": workflow, "input": inp}).json()["id"] for _ in range(tasks)
            ]
            while client.get("/v1/tasks", params={"status": ["queued", "running"], "limit": 1}).json()["items"]:
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            cpu_ms = {k: (v - cpu[k]) * 1000 / tasks for k, v in _cpu(c).items()}
            rows = [client.get(f"/v1/tasks/{i}").json() for i in ids]
            if failed := [r["id"] for r in rows if r["status"] != "succeeded"]:
                raise SystemExit(f"{len(failed)} {name} tasks did not succeed on {engine} with {workers} worker(s)")
            out[name] = Drain(
                rate=tasks / elapsed,
                latency_ms=statistics.median((r["finished_at"] - r["created_at"]) * 1000 for r in rows),
                phases=_phases(rows, c.env.get("KEEL_TEMPORAL_ADDRESS")),
                cpu_ms=cpu_ms
                | {"machine busy %": cpu_ms.pop("busy") / cpu_ms.pop("elapsed") / (os.cpu_count() or 1) * 100},
            )
    return out


def _cpu(c: Cluster) -> dict[str, float]:
    """CPU seconds used so far by each group of processes this run started (the keel API and workers, Postgres,
    Redis and Temporal with every process under them, this client), and the machine's busy and elapsed CPU
    seconds (``/proc/stat``: all cores, every user)."""
    return _cpu_of({"keel API": [p.proc.pid for p in c.apis], "keel workers": [p.proc.pid for p in c.workers]})


def _cpu_of(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each group (its processes and every process under them), of the servers ``scripts/``
    started, of this client, and the machine's busy and elapsed CPU seconds (``/proc/stat``: all cores, every
    user)."""
    from scaleout import services_dir

    def pid_file(path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    hz = os.sysconf("SC_CLK_TCK")

    def tree(root: int | None) -> float:
        if root is None:
            return 0.0
        pids, todo = set(), [root]
        while todo:
            pid = todo.pop()
            pids.add(pid)
            todo += [child for child, parent in parents.items() if parent == pid and child not in pids]
        return sum(ticks.get(pid, 0) for pid in pids) / hz

    services = services_dir() or Path("/nonexistent")
    me = os.times()
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return {
        **{name: sum(tree(pid) for pid in pids) for name, pids in groups.items()},
        "Postgres": tree(pid_file(services / "postgres" / "data" / "postmaster.pid")),
        "Redis": tree(pid_file(services / "redis" / "redis.pid")),
        "Temporal server": tree(pid_file(services / "temporal" / "temporal.pid")),
        "this client": me.user + me.system,
        "busy": (sum(cpu) - cpu[3] - cpu[4]) / hz,
        "elapsed": sum(cpu) / hz / (os.cpu_count() or 1),
    }


def temporal_floor(workers: int, tasks: int, concurrency: int) -> Drain:
    """The floor under keel on Temporal, in the same run: ``tasks`` workflows that do nothing, started by a bare
    Temporal client (at most ``concurrency`` at a time, as keel's dispatch slots allow) and run by ``workers``
    processes of a bare Temporal worker. What the dev server and the SDK cost per workflow, with no keel at all."""
    address, queue = service_url("temporal"), f"floor-{uuid.uuid4().hex[:8]}"
    procs = [
        subprocess.Popen([sys.executable, __file__, "--floor-worker", address, queue], stdout=subprocess.DEVNULL)
        for _ in range(workers)
    ]
    try:
        time.sleep(3.0)  # the workers connect and start polling
        asyncio.run(_start_floor(address, queue, 20, concurrency))  # warm up
        before = _cpu_of({"Temporal workers": [p.pid for p in procs]})
        started = time.monotonic()
        asyncio.run(_start_floor(address, queue, tasks, concurrency))
        elapsed = time.monotonic() - started
        cpu_ms = {
            k: (v - before[k]) * 1000 / tasks for k, v in _cpu_of({"Temporal workers": [p.pid for p in procs]}).items()
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    busy = cpu_ms.pop("busy") / cpu_ms.pop("elapsed") / (os.cpu_count() or 1) * 100
    return Drain(rate=tasks / elapsed, latency_ms=float("nan"), phases={}, cpu_ms=cpu_ms | {"machine busy %": busy})


async def _start_floor(address: str, queue: str, tasks: int, concurrency: int) -> None:
    from temporalio.client import Client

    client = await Client.connect(address)
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            handle = await client.start_workflow("floor.noop", id=f"floor-{uuid.uuid4().hex}", task_queue=queue)
            await handle.result()

    await asyncio.gather(*(one() for _ in range(tasks)))


@workflow.defn(name="floor.noop")
class FloorNoop:
    """The floor's workflow (:func:`temporal_floor`): it returns at once."""

    @workflow.run
    async def run(self) -> None:
        return None


def _floor_worker(address: str, queue: str) -> None:
    """A bare Temporal worker for :func:`temporal_floor`."""
    from temporalio.client import Client
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker

    async def serve() -> None:
        client = await Client.connect(address)
        runner = UnsandboxedWorkflowRunner()
        await Worker(client, task_queue=queue, workflows=[FloorNoop], workflow_runner=runner).run()

    asyncio.run(serve())


def _phases(rows: list[dict[str, Any]], temporal: str | None) -> dict[str, float]:
    """Each phase's median (ms) from keel's own time stamps (submitted, leased, envelope stored) and, on Temporal,
    the workflow's history: when Temporal started it, when a worker first picked up its workflow task, and when it
    closed (after the envelope was stored, by the task that completed it)."""
    stamps = [[r["created_at"], r["started_at"], r["finished_at"]] for r in rows]
    names = ["submitted → leased", "leased → envelope stored"]
    if temporal is not None:
        history = asyncio.run(_histories(temporal, [r["id"] for r in rows]))
        stamps = [
            [c, leased, started, picked, done, closed]
            for (c, leased, done), (started, picked, closed) in zip(stamps, history, strict=True)
        ]
        names = [
            "submitted → leased (keel's queue)",
            "leased → workflow started (start_workflow)",
            "workflow started → first workflow task on a worker",
            "first workflow task → envelope stored (the run)",
            "envelope stored → workflow closed",
        ]
    return {name: statistics.median((s[i + 1] - s[i]) * 1000 for s in stamps) for i, name in enumerate(names)}


async def _histories(address: str, ids: list[str]) -> list[tuple[float, float, float]]:
    """(workflow started, first workflow task started, workflow closed) of each task's workflow, epoch seconds."""
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import Client

    client = await Client.connect(address)
    out = []
    for task_id in ids:
        history = await client.get_workflow_handle(task_id).fetch_history()
        first: dict[int, float] = {}
        for event in history.events:
            first.setdefault(event.event_type, event.event_time.ToDatetime(UTC).timestamp())
        out.append(
            (
                first[EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED],
                first[EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED],
                first[EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED],
            )
        )
    return out


async def per_step(
    engine: str, database: str, rounds: int, *, noop: bool = False, poll_s: float = 0.01
) -> tuple[float, float]:
    """Median ms per step of a 20-step task on ``engine``, and of the plain-loop baseline. ``diagnostic`` steps each
    write 4 durable tokens, a partial result and progress; ``noop``: ``peer_chain``, steps that only checkpoint.
    ``poll_s``: how often the engine's idle workers poll the queue (keel's default is 0.5 s)."""
    from keel.backends import open_store
    from keel.memory.types import NewTask
    from keel.orchestration.engine.runtime import EmbeddedEngine
    from keel.orchestration.workflows import default_registry

    def default_registry_and_peers() -> Any:
        registry = default_registry()
        registry.load("peer_workflows:WORKFLOWS")
        return registry

    store = open_store(database)
    if engine == "temporal":
        from keel.backends.temporal import TemporalEngine

        runtime: object = TemporalEngine(
            store,
            default_registry_and_peers(),
            address=service_url("temporal"),
            task_queue=f"bench-{uuid.uuid4().hex[:8]}",
            poll_s=poll_s,
        )
    else:
        runtime = EmbeddedEngine(store, default_registry_and_peers(), poll_s=poll_s)
    await runtime.start(recover=False)  # type: ignore[attr-defined]
    try:
        per, base = [], []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            for _ in range(20):
                await asyncio.sleep(0)
            base.append((time.perf_counter() - t0) * 1000 / 20)
            inp = {"steps": 20} if noop else {"steps": 20, "step_seconds": 0}
            new = NewTask(tenant="bench", workflow="peer_chain" if noop else "diagnostic", input=inp)
            created = await store.create_task(new, None, time.time())
            assert created.task is not None
            runtime.wake()  # type: ignore[attr-defined]
            while True:
                task = await store.get_task(created.task.id)
                assert task is not None
                if task.status.terminal:
                    break
                await asyncio.sleep(0.005)
            assert task.envelope is not None and task.envelope["status"] == "success", task.envelope
            assert task.started_at is not None and task.finished_at is not None
            per.append((task.finished_at - task.started_at) * 1000 / 20)
        return statistics.median(per[1:]), statistics.median(base[1:])  # the first round warms up
    finally:
        await runtime.stop()  # type: ignore[attr-defined]
        await store.aclose()


@contextlib.contextmanager
def durable_postgres() -> Iterator[str]:
    """A throwaway Postgres from ``scripts/postgres.sh`` that keeps its default durability (fsync and
    ``synchronous_commit`` on: every commit waits for its WAL flush), as a production server does; its admin URL."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="keel-bench-pg-") as tmp:
        Path(tmp).chmod(0o755)  # as root, Postgres runs as the `postgres` user, which must reach its directory
        env = {k: v for k, v in os.environ.items() if k != "KEEL_PG_EPHEMERAL"} | {"KEEL_PG_DIR": f"{tmp}/pg"}
        script = ["bash", str(root / "scripts" / "postgres.sh")]
        url = subprocess.run([*script, "start"], env=env, check=True, capture_output=True, text=True).stdout.strip()
        try:
            yield url.splitlines()[-1]
        finally:
            subprocess.run([*script, "stop"], env=env, check=False, capture_output=True)


def per_step_against_sqlite(rounds: int, tasks: int, poll_s: float = 0.01) -> dict[str, dict[str, list[float]]]:
    """ms per step of a 20-step task on a durable Postgres and on SQLite, for ``peer_chain`` and ``diagnostic``:
    each round on a fresh database of each, the order flipped every round; ``tasks`` tasks a round (+1 to warm
    up). Returns {workload: {backend: [the round medians]}}, with the fsync probe under ``"fsync"``."""
    out: dict[str, dict[str, list[float]]] = {w: {"postgres": [], "sqlite": []} for w in ("peer_chain", "diagnostic")}
    out["fsync"] = {"sqlite": []}
    with durable_postgres() as admin:
        for r in range(rounds):
            order = ("postgres", "sqlite") if r % 2 == 0 else ("sqlite", "postgres")
            for workload in ("peer_chain", "diagnostic"):
                for backend in order:
                    with tempfile.TemporaryDirectory() as tmp:
                        if backend == "sqlite":
                            db = f"sqlite:///{tmp}/keel.db"
                            out["fsync"]["sqlite"].append(fsync_commit_ms(Path(tmp)))
                        else:
                            db = fresh_database(admin)
                        ms, _ = asyncio.run(
                            per_step("embedded", db, tasks, noop=workload == "peer_chain", poll_s=poll_s)
                        )
                    out[workload][backend].append(ms)
                    print(f"round {r + 1} {workload} {backend}: {ms:.2f} ms a step", flush=True)
    return out


def per_step_report(figures: dict[str, dict[str, list[float]]], rounds: int, tasks: int, poll_s: float) -> str:
    med = statistics.median
    lines = [
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {rounds} rounds of {tasks} twenty-step tasks, "
        f"a fresh database each round, Postgres and SQLite alternately; idle workers poll every {poll_s:g} s.",
        "",
        "| 20-step task, per step (median of rounds; min–max) | Postgres | SQLite | Postgres / SQLite |",
        "|---|---|---|---|",
    ]
    for workload in ("peer_chain", "diagnostic"):
        pg, lite = figures[workload]["postgres"], figures[workload]["sqlite"]
        lines.append(
            f"| `{workload}` | {med(pg):.2f} ms ({min(pg):.2f}–{max(pg):.2f}) | "
            f"{med(lite):.2f} ms ({min(lite):.2f}–{max(lite):.2f}) | {med(pg) / med(lite):.2f}× |"
        )
    probe = figures["fsync"]["sqlite"]
    lines += [
        "",
        f"Bare fsync'd SQLite commit on the same disk: {med(probe):.2f} ms ({min(probe):.2f}–{max(probe):.2f}).",
    ]
    return "\n".join(lines)


Runs = dict[tuple[str, int], list[dict[str, Drain]]]
"""(engine, workers) to the drains of each round."""


def throughput_report(runs: Runs, tasks: int) -> str:
    """The throughput tables: each workload's tasks/s (median of the rounds) on both engines, and where a task's
    time went on each (the phases of the round with the median rate)."""
    workloads = list(runs[next(k for k in runs if k[0] == "embedded")][0])
    workers = sorted({w for e, w in runs if e != "floor"})
    rounds = len(next(iter(runs.values())))

    def median(engine: str, w: int, name: str) -> Drain:
        drains = sorted((r[name] for r in runs[(engine, w)]), key=lambda d: d.rate)
        return drains[len(drains) // 2]

    lines = [
        f"**Throughput**: {tasks} tasks of each workload through 1 API replica, drained by 1 or 2 `keel worker`s; "
        f"{rounds} round(s), the engines and worker counts interleaved in each, medians. tasks/s runs from the first "
        "submission to the last finish; latency is a task's submission to its envelope, the median task.",
        "",
        "| workload | workers | embedded | Temporal | Temporal / embedded | latency p50 embedded / Temporal |",
        "|---|---|---|---|---|---|",
    ]
    for name in workloads:
        for w in workers:
            e, t = median("embedded", w, name), median("temporal", w, name)
            lines.append(
                f"| {name} | {w} | {e.rate:.1f} tasks/s | {t.rate:.1f} tasks/s | {t.rate / e.rate:.2f}× "
                f"| {e.latency_ms:.0f} / {t.latency_ms:.0f} ms |"
            )
    w = max(workers)
    floor = median("floor", w, "no-op")
    lines += [
        "",
        f"The floor under Temporal, in the same rounds: a bare Temporal worker ({w} processes, the SDK, no keel) runs "
        f"{floor.rate:.1f} workflows/s that do nothing, started by a bare client {8 * w} at a time; keel's no-op "
        f"task on Temporal runs at {median('temporal', w, 'no-op').rate / floor.rate:.2f}× that.",
    ]
    for engine in ("embedded", "temporal"):
        w = max(workers)
        lines += ["", f"Where a task's time goes on {engine}, {w} worker(s), medians (ms):", ""]
        lines += ["| phase | " + " | ".join(workloads) + " |", "|---|" + "---|" * len(workloads)]
        phases = median(engine, w, workloads[0]).phases
        for phase in phases:
            cells = " | ".join(f"{median(engine, w, n).phases[phase]:.1f}" for n in workloads)
            lines.append(f"| {phase} | {cells} |")
    lines += ["", f"CPU per task, {max(workers)} worker(s) (ms; the round with the median rate):", ""]
    columns = [(n, e) for n in workloads for e in ("embedded", "temporal")] + [("no-op", "floor")]
    names = {"embedded": "embedded", "temporal": "Temporal", "floor": "bare Temporal"}
    lines += ["| process | " + " | ".join(f"{n}, {names[e]}" for n, e in columns) + " |"]
    lines += ["|---|" + "---|" * len(columns)]
    groups = list(dict.fromkeys(g for n, e in columns for g in median(e, w, n).cpu_ms))
    for group in groups:
        cells = " | ".join(
            f"{median(e, w, n).cpu_ms[group]:.1f}" if group in median(e, w, n).cpu_ms else "—" for n, e in columns
        )
        lines.append(f"| {group} | {cells} |")
    return "\n".join(lines)


def report(runs: Runs, steps: dict[str, tuple[float, float]], tasks: int) -> str:
    return f"""{START}
## Engines: embedded against Temporal (`bench/bench_engines.py`)

{datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}. One Postgres 18
(pgvector), one Redis and the Temporal dev server (SQLite-backed), all on loopback, sharing the 2 cores with
the keel processes.

{throughput_report(runs, tasks)}

**Per-step overhead**: one task of 20 no-op steps, in one process, on Postgres; the median of the rounds.

| engine | ms per step (median) | relative to embedded |
|---|---|---|
| embedded | {steps["embedded"][0]:.2f} | 1.00× |
| Temporal | {steps["temporal"][0]:.2f} | {steps["temporal"][0] / steps["embedded"][0]:.2f}× |

(A plain awaited no-op coroutine, timed alongside as the floor, costs {steps["embedded"][1] * 1000:.1f} µs.)

A step on the embedded engine costs one Postgres transaction (the checkpoint and its events). On Temporal it also
costs a local activity, which the workflow task records as a marker in Temporal's history; the checkpoint lookup
that keeps a finished step from running twice is one more read. With every process on the same 2 cores, a
second worker adds contention as much as capacity.
{END}"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="worker counts to drain with, comma-separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of " + ", ".join(WORKLOADS))
    parser.add_argument("--only", choices=("throughput", "per_step"), help="run one part (printed, not written)")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--per-step", action="store_true", help="only a step on durable Postgres against SQLite")
    parser.add_argument("--poll-s", type=float, default=0.01, help="--per-step: the idle workers' poll interval")
    args = parser.parse_args()
    if args.per_step:
        figures = per_step_against_sqlite(args.rounds, args.tasks, args.poll_s)
        print(per_step_report(figures, args.rounds, args.tasks, args.poll_s))
        return 0
    engines = ("embedded", "temporal")
    runs: Runs = {}
    if args.only != "per_step":
        workers, workloads = [int(w) for w in args.workers.split(",")], args.workloads.split(",")
        for _ in range(args.throughput_rounds):  # interleaved: a shared machine's load weighs on every column
            for w in workers:
                for e in engines:
                    runs.setdefault((e, w), []).append(throughput(e, w, args.tasks, workloads))
            w = max(workers)
            runs.setdefault(("floor", w), []).append({"no-op": temporal_floor(w, args.tasks, 8 * w)})
        if args.only:
            print(throughput_report(runs, args.tasks))
            return 0
    steps = {e: asyncio.run(per_step(e, fresh_database(service_url("postgres")), args.rounds)) for e in engines}
    if args.only:
        print(steps)
        return 0
    text = report(runs, steps, args.tasks)
    print(text)
    if not args.no_doc:
        write_section(text, START, END)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor-worker"]:  # a process of temporal_floor's, not the benchmark
        _floor_worker(*sys.argv[2:4])
        sys.exit(0)
    try:
        code = main()
    finally:
        stop_services()
    sys.exit(code)
