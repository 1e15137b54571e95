"""Benchmark: the embedded engine against Temporal, on one Postgres (started by ``scripts/``).

Run: ``.venv/bin/python bench/bench_engines.py`` (a few minutes; ``--tasks N``, ``--no-doc``).

1. **Throughput**: 1 API replica and 1 or 2 ``keel worker`` processes (Redis for fan-out), on each engine. N tasks
   of the built-in ``diagnostic`` workflow (3 durable no-op steps) are submitted through the API, and the queue
   drains; tasks/s runs from the first submission to the last finish.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _doc import cpu_model, write_section  # noqa: E402

from scaleout import cluster, fresh_database, service_url, stop_services  # noqa: E402

START, END = "<!-- bench_engines:start -->", "<!-- bench_engines:end -->"


def throughput(engine: str, workers: int, tasks: int) -> float:
    with (
        tempfile.TemporaryDirectory() as tmp,
        cluster(Path(tmp), apis=1, workers=workers, sink_url="http://127.0.0.1:9", engine=engine) as c,
    ):
        api = c.apis[0]
        headers = {"Authorization": f"Bearer {c.key}"}
        body = {"workflow": "diagnostic", "input": {"steps": 3, "step_seconds": 0}}
        with httpx.Client(base_url=api.url or "", headers=headers, timeout=30) as client:
            time.sleep(2.0)  # the workers connect and start polling
            started = time.monotonic()
            ids = [client.post("/v1/tasks", json=body).json()["id"] for _ in range(tasks)]
            while True:
                open_ = client.get("/v1/tasks", params={"status": ["queued", "running"], "limit": 1}).json()
                if not open_["items"]:
                    break
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            failed = [i for i in ids if client.get(f"/v1/tasks/{i}").json()["status"] != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} tasks did not succeed on {engine} with {workers} worker(s)")
    return tasks / elapsed


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


def sqlite_fsync_ms(directory: Path, n: int = 50) -> float:
    """The median of a bare fsync'd one-row SQLite commit in ``directory``: what the disk charges a commit now."""
    import sqlite3

    db = sqlite3.connect(directory / "probe.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        db.execute("INSERT INTO t VALUES (?)", (i,))
        times.append((time.perf_counter() - t0) * 1000)
    db.close()
    return statistics.median(times)


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
                            out["fsync"]["sqlite"].append(sqlite_fsync_ms(Path(tmp)))
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


def report(rates: dict[tuple[str, int], float], steps: dict[str, tuple[float, float]], tasks: int) -> str:
    e1, e2 = rates[("embedded", 1)], rates[("embedded", 2)]
    t1, t2 = rates[("temporal", 1)], rates[("temporal", 2)]
    return f"""{START}
## Engines: embedded against Temporal (`bench/bench_engines.py`)

{datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}. One Postgres 18
(pgvector), one Redis and the Temporal dev server (SQLite-backed), all on loopback, sharing the 2 cores with
the keel processes.

**Throughput**: {tasks} tasks of `diagnostic` (3 durable no-op steps) through 1 API replica.

| workers | embedded | Temporal | Temporal / embedded |
|---|---|---|---|
| 1 | {e1:.1f} tasks/s | {t1:.1f} tasks/s | {t1 / e1:.2f}× |
| 2 | {e2:.1f} tasks/s | {t2:.1f} tasks/s | {t2 / e2:.2f}× |
| 2 workers / 1 | {e2 / e1:.2f}× | {t2 / t1:.2f}× | |

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
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--per-step", action="store_true", help="only a step on durable Postgres against SQLite")
    parser.add_argument("--poll-s", type=float, default=0.01, help="--per-step: the idle workers' poll interval")
    args = parser.parse_args()
    if args.per_step:
        figures = per_step_against_sqlite(args.rounds, args.tasks, args.poll_s)
        print(per_step_report(figures, args.rounds, args.tasks, args.poll_s))
        return 0
    rates = {(e, w): throughput(e, w, args.tasks) for e in ("embedded", "temporal") for w in (1, 2)}
    engines = ("embedded", "temporal")
    steps = {e: asyncio.run(per_step(e, fresh_database(service_url("postgres")), args.rounds)) for e in engines}
    text = report(rates, steps, args.tasks)
    print(text)
    if not args.no_doc:
        write_section(text, START, END)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        stop_services()
    sys.exit(code)
