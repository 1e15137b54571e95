"""A scale-out cluster on one machine, for the crash test and its benchmark: Postgres and Redis started by
``scripts/``, N ``keel serve --role api`` processes and M ``keel worker`` processes sharing a fresh database, and
a loopback effect sink. Workers can be killed with SIGKILL and restarted.

``run_crash_test`` submits tasks of ``effect_tools:charge_thrice`` (three write-tool steps each) through the API
replicas while a killer thread kills a random worker every few seconds, waits for the queue to drain, and reports
what the issue gates on: lost tasks, duplicated effects, ``outcome_unknown`` effects, and recovery times.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
KEEL = Path(sys.executable).parent / "keel"


class Unavailable(Exception):
    """A server the cluster needs could not be started; the message says why."""


_DIRS = {"postgres": "KEEL_PG_DIR", "redis": "KEEL_REDIS_DIR", "temporal": "KEEL_TEMPORAL_DIR"}
_SERVICES: Path | None = None
_STARTED: set[str] = set()


def _service_env(name: str) -> dict[str, str]:
    """The servers these tests start live in one temporary directory per test session (never the developer's
    own under .keel/services), and are stopped by :func:`stop_services`."""
    global _SERVICES
    if _SERVICES is None:
        _SERVICES = Path(tempfile.mkdtemp(prefix="keel-services-"))
        _SERVICES.chmod(0o755)  # as root, Postgres runs as the `postgres` user, which must reach its directory
    env = {**os.environ, _DIRS[name]: str(_SERVICES / name)}
    if name == "postgres":
        env["KEEL_PG_EPHEMERAL"] = "1"  # a throwaway server: no fsync
    if name == "temporal":
        env["KEEL_TEMPORAL_EPHEMERAL"] = "1"  # likewise
    return env


def service_url(name: str) -> str:
    """Start ``scripts/<name>.sh`` (idempotent) and return its URL, or raise Unavailable with the reason."""
    script = ROOT / "scripts" / f"{name}.sh"
    try:
        done = subprocess.run(
            ["bash", str(script), "start"],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            env=_service_env(name),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{script.name} start failed: {exc}") from exc
    if done.returncode != 0:
        raise Unavailable(f"{script.name} start exited {done.returncode}: {(done.stderr or done.stdout)[-500:]}")
    _STARTED.add(name)
    return done.stdout.strip().splitlines()[-1]


def services_dir() -> Path | None:
    """The directory of the servers :func:`service_url` started (``<name>/`` each: pid files, logs), if any."""
    return _SERVICES


def stop_services() -> None:
    """Stop every server :func:`service_url` started, and remove their files."""
    for name in sorted(_STARTED):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                ["bash", str(ROOT / "scripts" / f"{name}.sh"), "stop"],
                capture_output=True,
                timeout=120,
                check=False,
                env=_service_env(name),
            )
    _STARTED.clear()
    if _SERVICES is not None:
        shutil.rmtree(_SERVICES, ignore_errors=True)


def fresh_database(admin_url: str) -> str:
    """A new, empty database on the server of ``admin_url``; its URL."""
    import psycopg

    name = f"keel_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute("SELECT 1")
    base, _, _ = admin_url.rpartition("/")
    url = f"{base}/{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return url


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    key: str = ""
    apis: list[Process] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    _count: int = 0

    def _spawn(self, name: str, args: list[str], port: int | None = None) -> Process:
        self._count += 1
        data = self.root / f"{name}-data"
        data.mkdir(exist_ok=True)
        log = self.root / f"{name}-{self._count}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")} | self.env
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(KEEL), *args, "--data-dir", str(data)],
                env=env,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return Process(name=name, proc=proc, log=log, url=f"http://127.0.0.1:{port}" if port else None)

    def start_api(self, port: int) -> Process:
        p = self._spawn(
            f"api{len(self.apis)}", ["serve", "--role", "api", "--port", str(port), "--log-level", "warning"], port
        )
        self.apis.append(p)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited {p.proc.returncode}:\n{p.output()}")
            try:
                if httpx.get(f"{p.url}/readyz", timeout=2).status_code == 200:
                    return p
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{p.name} not ready:\n{p.output()}")

    def start_worker(self, index: int | None = None) -> Process:
        name = f"worker{len(self.workers) if index is None else index}"
        p = self._spawn(name, ["worker"])
        if index is None:
            self.workers.append(p)
        else:
            self.workers[index] = p
        return p

    def kill_worker(self, index: int) -> None:
        """SIGKILL, as a crash would, then a new process in its place."""
        victim = self.workers[index]
        with_signal = victim.proc.poll() is None
        if with_signal:
            os.kill(victim.proc.pid, signal.SIGKILL)
            self.kills.append(time.time())
        victim.proc.wait(timeout=10)
        self.start_worker(index)

    def stop(self) -> None:
        for p in [*self.apis, *self.workers]:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in [*self.apis, *self.workers]:
            try:
                p.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def cluster(
    root: Path,
    *,
    apis: int,
    workers: int,
    sink_url: str,
    engine: str = "embedded",
    extra_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Postgres (a fresh database) and Redis from ``scripts/``, with ``engine="temporal"`` the Temporal dev server
    too (a task queue of its own), then the API and worker processes."""
    database = fresh_database(service_url("postgres"))
    redis_url = service_url("redis")
    if engine == "temporal":
        extra_env = {
            "KEEL_ENGINE": "temporal",
            "KEEL_TEMPORAL_ADDRESS": service_url("temporal"),
            "KEEL_TEMPORAL_TASK_QUEUE": f"keel-{uuid.uuid4().hex[:8]}",
            **(extra_env or {}),
        }
    env = {
        "KEEL_STORE_URL": database,
        "KEEL_REDIS_URL": redis_url,
        "KEEL_TOOLS": "effect_tools:TOOLS",
        "KEEL_WORKFLOWS": "effect_tools:WORKFLOWS",
        "KEEL_EMBEDDING_MODEL": "hash:64",
        "KEEL_LEASE_SECONDS": "3",
        "KEEL_POLL_INTERVAL_S": "0.1",
        "KEEL_WORKERS": "8",
        # The test helpers, then whatever the test run put first (a worktree's src): the servers run that code.
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
        "SINK_URL": sink_url,
        **(extra_env or {}),
    }
    c = Cluster(root=root, env=env)
    try:
        keys = subprocess.run(
            [str(KEEL), "keys", "create", "--tenant", "crash", "--scopes", "tasks:read,tasks:write"],
            env={k: v for k, v in os.environ.items() if not k.startswith("KEEL_")} | env | {"KEEL_DATA_DIR": str(root)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        c.key = keys.stdout.strip()
        for _ in range(apis):
            c.start_api(free_port())
        for _ in range(workers):
            c.start_worker()
        yield c
    finally:
        c.stop()


@dataclass
class CrashReport:
    tasks: int
    succeeded: int
    failed: int
    lost: int
    effects: int
    duplicate_effects: int
    outcome_unknown: int
    kills: int
    recovery_p50_s: float | None
    recovery_p95_s: float | None
    drain_s: float
    failures: list[str] = field(default_factory=list)
    """Why each task that did not succeed ended as it did (its status and first error)."""

    def lines(self) -> list[str]:
        def s(v: float | None) -> str:
            return "—" if v is None else f"{v:.2f} s"

        return [
            f"tasks {self.tasks}: succeeded {self.succeeded}, failed {self.failed}, lost {self.lost}",
            f"effects {self.effects} (expected {3 * self.tasks}), duplicated {self.duplicate_effects}, "
            f"outcome_unknown {self.outcome_unknown}",
            f"kills {self.kills}; recovery (kill → every in-flight task moving again) p50 {s(self.recovery_p50_s)}, "
            f"p95 {s(self.recovery_p95_s)}; drained in {self.drain_s:.1f} s",
            *(f"not a success: {f}" for f in self.failures[:10]),
        ]


def run_crash_test(
    c: Cluster,
    sink: Any,
    *,
    tasks: int,
    kill_every: tuple[float, float],
    drain_timeout: float,
    seed: int = 7,
) -> CrashReport:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {c.key}"}
    ids: list[str] = []
    started = time.monotonic()
    for i in range(tasks):
        body = {"workflow": "charge_thrice", "input": {"account": f"acct-{i}"}}
        for attempt in range(10):
            api = c.apis[(i + attempt) % len(c.apis)]
            try:
                r = httpx.post(
                    f"{api.url}/v1/tasks", json=body, headers={**headers, "Idempotency-Key": f"crash-{i}"}, timeout=10
                )
            except httpx.TransportError:
                continue
            if r.status_code == 202:
                ids.append(r.json()["id"])
                break
        else:
            raise AssertionError(f"task {i} could not be submitted")
    stop = threading.Event()

    def killer() -> None:
        while not stop.wait(rng.uniform(*kill_every)):
            c.kill_worker(rng.randrange(len(c.workers)))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    deadline = time.monotonic() + drain_timeout
    try:
        while time.monotonic() < deadline:
            open_ = 0
            for api in c.apis:
                try:
                    r = httpx.get(
                        f"{api.url}/v1/tasks", params={"status": ["queued", "running"], "limit": 1}, headers=headers
                    )
                    open_ = len(r.json()["items"])
                    break
                except httpx.TransportError:
                    continue
            if open_ == 0:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=30)
    drain = time.monotonic() - started
    statuses, outcome_unknown, failures = _outcomes(c.apis[0].url or "", headers, ids)
    recoveries = asyncio.run(_recoveries(c.env["KEEL_STORE_URL"], ids, list(c.kills)))
    succeeded = sum(1 for s in statuses.values() if s == "succeeded")
    failed = sum(1 for s in statuses.values() if s in ("failed", "cancelled"))
    return CrashReport(
        tasks=tasks,
        succeeded=succeeded,
        failed=failed,
        lost=tasks - succeeded - failed,
        effects=len(sink.hits),
        duplicate_effects=sum(n - 1 for n in sink.hits.values() if n > 1),
        outcome_unknown=outcome_unknown,
        kills=len(c.kills),
        recovery_p50_s=statistics.median(recoveries) if recoveries else None,
        recovery_p95_s=_p95(recoveries),
        drain_s=drain,
        failures=failures,
    )


def _outcomes(url: str, headers: dict[str, str], ids: list[str]) -> tuple[dict[str, str], int, list[str]]:
    """Each task's status, how many of its effects were left ``outcome_unknown``, and why the unsuccessful ended."""
    statuses: dict[str, str] = {}
    outcome_unknown = 0
    failures: list[str] = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for task_id in ids:
            r = client.get(f"/v1/tasks/{task_id}")
            if r.status_code != 200:
                statuses[task_id] = "missing"
                failures.append(f"{task_id} missing: HTTP {r.status_code}")
                continue
            task = r.json()
            statuses[task_id] = task["status"]
            if task["status"] != "succeeded":
                first = ((task.get("envelope") or {}).get("errors") or [{}])[0]
                failures.append(f"{task_id} {task['status']}: {first.get('type')}: {first.get('message')}")
            effects = client.get(f"/v1/tasks/{task_id}/effects").json()
            outcome_unknown += sum(1 for e in effects if e["status"] == "outcome_unknown")
    return statuses, outcome_unknown, failures


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def _recoveries(store_url: str, ids: list[str], kills: list[float]) -> list[float]:
    """For each kill: how long until every step running at that moment (started, not yet completed or failed)
    showed progress again (its task's next event), i.e. until the queue had taken back everything the dead worker
    was doing. Engine-neutral: it reads only the durable event log."""
    from keel.backends import open_store

    store = open_store(store_url)
    try:
        logs = [[(ev.created_at, ev.type) for ev in await store.read(task_id, 0, limit=10_000)] for task_id in ids]
    finally:
        await store.aclose()
    out: list[float] = []
    for kill in kills:
        delays = []
        for events in logs:
            before = [t for t in events if t[0] <= kill]
            after = [t for t in events if t[0] > kill]
            running = [t for t in before if t[1] in ("step_started", "step_retrying", "step_completed", "step_failed")]
            if running and running[-1][1] in ("step_started", "step_retrying") and after:
                delays.append(after[0][0] - kill)
        if delays:
            out.append(max(delays))
    return out
