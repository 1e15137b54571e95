"""The engine conformance suite: the same workflows give the same outcomes on the embedded engine and on Temporal
(``KEEL_ENGINE=temporal``, a dev server started by ``scripts/temporal.sh``): durable steps and their events,
parallel branches with per-item timeouts and a minimum success, retries, cancellation that keeps partial results,
budgets, a write tool applied once, and a run that resumes on a new engine without re-running finished steps.
The Temporal half is skipped, with the reason, when its server cannot be had."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from keel.backends.sqlite import SQLiteStore
from keel.memory.types import Decision, NewTask, Task, TaskStatus, Verdict
from keel.orchestration.engine import Engine
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.retry import RetryPolicy
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry
from keel.orchestration.tools import Tool, ToolCatalog, ToolContext

ROOT = Path(__file__).resolve().parents[3]
CALLS: dict[str, int] = {}
"""How often each step body ran, by name: what "never run twice" is checked on."""


def ran(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


class Steps(BaseModel):
    n: int = 3
    pause_s: float = 0.0
    long_s: float = 0.0
    label: str = "x"


async def steps(ctx: WorkflowContext, inp: Steps) -> dict[str, Any]:
    out = []
    for i in range(1, inp.n + 1):

        async def body(i: int) -> int:
            ran(f"{inp.label}:step-{i}")
            await asyncio.sleep(inp.long_s if i == inp.n and inp.long_s else inp.pause_s)
            return i * 10

        out.append(await ctx.step(f"step-{i}", body, i))
        await ctx.partial_result("done", out)
        await ctx.progress(i / inp.n, f"step-{i}")
    return {"values": out}


class Fanout(BaseModel):
    slow_s: float = 10.0


async def fanout(ctx: WorkflowContext, inp: Fanout) -> dict[str, Any]:
    async def branch(i: int) -> int:
        await asyncio.sleep(inp.slow_s if i == 2 else 0.3)
        return i

    mapped = await ctx.map(branch, [0, 1, 2, 3], name="fan", timeout_per_item=1.0, min_success=3)
    return {"ok": mapped.succeeded}


class Flaky(BaseModel):
    label: str
    fail_times: int = 2
    error: str = "transient"


async def flaky(ctx: WorkflowContext, inp: Flaky) -> dict[str, Any]:
    async def body() -> str:
        ran(inp.label)
        if CALLS[inp.label] <= inp.fail_times:
            raise (TimeoutError("upstream slow") if inp.error == "transient" else ValueError("bad input"))
        return "ok"

    value = await ctx.step("flaky", body, retry=RetryPolicy(initial_interval=0.05, jitter=0, max_attempts=3))
    return {"value": value}


class Charge(BaseModel):
    label: str


async def charge_args_model(args: Charge, tc: ToolContext) -> dict[str, Any]:
    ran(f"{args.label}:charged")
    return {"charged": True, "key": tc.idempotency_key}


CHARGE = Tool(name="charge", description="A write.", fn=charge_args_model, input_model=Charge, effect="write")


async def pay(ctx: WorkflowContext, inp: Charge) -> dict[str, Any]:
    receipt = await ctx.tool("charge", {"label": inp.label})
    return {"receipt": receipt}


WORKFLOWS = [
    Workflow(name="steps", input_model=Steps, fn=steps),
    Workflow(name="fanout", input_model=Fanout, fn=fanout),
    Workflow(name="flaky", input_model=Flaky, fn=flaky),
    Workflow(name="pay", input_model=Charge, fn=pay),
]


def registry() -> WorkflowRegistry:
    r = WorkflowRegistry()
    for wf in WORKFLOWS:
        r.register(wf)
    return r


@pytest.fixture(scope="session")
def temporal_address() -> str:
    pytest.importorskip("temporalio", reason="the Temporal SDK is not installed: pip install 'keel-runtime[temporal]'")
    from scaleout import Unavailable, service_url

    try:
        return service_url("temporal")
    except Unavailable as exc:
        pytest.skip(f"the Temporal dev server could not be started: {exc}")


EngineFactory = Callable[[], Engine]


@pytest.fixture(params=["embedded", "temporal"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    store = SQLiteStore(tmp_path / "k.db")
    address = request.getfixturevalue("temporal_address") if request.param == "temporal" else None
    h = Harness(request.param, store, address)
    try:
        yield h
    finally:
        await h.stop()
        await store.aclose()


class Harness:
    def __init__(self, kind: str, store: SQLiteStore, address: str | None) -> None:
        self.kind, self.store, self.address = kind, store, address
        self.queue = f"keel-test-{uuid.uuid4().hex[:8]}"
        self.engine: Engine | None = None

    def new_engine(self) -> Engine:
        tools = ToolCatalog([CHARGE])
        if self.kind == "embedded":
            return EmbeddedEngine(self.store, registry(), poll_s=0.02, lease_s=3, tools=tools)
        from keel.backends.temporal import TemporalEngine

        assert self.address is not None
        return TemporalEngine(
            self.store,
            registry(),
            address=self.address,
            task_queue=self.queue,
            poll_s=0.05,
            lease_s=3,
            tools=tools,
            graceful_shutdown_s=0.2,
        )

    async def start(self) -> Engine:
        self.engine = self.new_engine()
        await self.engine.start(recover=False)
        return self.engine

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    async def submit(
        self,
        workflow: str,
        inp: dict[str, Any],
        budget: dict[str, Any] | None = None,
        policy: dict[str, Any] | None = None,
    ) -> str:
        new = NewTask(tenant="t", workflow=workflow, input=inp, budget=budget or {}, policy=policy or {})
        created = await self.store.create_task(new, None, time.time())
        assert created.task is not None
        if self.engine is not None:
            self.engine.wake()
        return created.task.id

    async def wait(self, task_id: str, timeout: float = 30, *, parked: bool = False) -> Task:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = await self.store.get_task(task_id)
            assert task is not None
            if task.status.terminal or (parked and task.status is TaskStatus.waiting_for_approval):
                return task
            await asyncio.sleep(0.02)
        raise AssertionError(f"{task_id} still {task.status} after {timeout}s")

    async def events(self, task_id: str) -> list[str]:
        return [e.type for e in await self.store.read(task_id, 0, limit=10_000)]


async def test_steps_events_and_envelope(harness: Harness) -> None:
    await harness.start()
    task_id = await harness.submit("steps", {"n": 3, "label": f"{harness.kind}-a"})
    done = await harness.wait(task_id)
    assert done.status is TaskStatus.succeeded and done.envelope is not None, done.envelope
    assert done.envelope["result"] == {"values": [10, 20, 30]}
    steps = done.envelope["metadata"]["steps"]
    assert [(s["name"], s["status"], s["replayed"]) for s in steps] == [
        ("step-1", "completed", False), ("step-2", "completed", False), ("step-3", "completed", False),
    ]  # fmt: skip
    types = await harness.events(task_id)
    assert types.count("step_completed") == 3 and types.count("partial_result") == 3 and types[-1] == "end"
    assert types.index("step_started") < types.index("step_completed")
    assert done.envelope["metadata"]["budget"]["used"]["steps"] == 3


async def test_parallel_branches_with_timeouts_and_a_minimum_success(harness: Harness) -> None:
    await harness.start()
    started = time.monotonic()
    done = await harness.wait(await harness.submit("fanout", {"slow_s": 10.0}))
    assert time.monotonic() - started < 6  # one second for the timeout, not ten, and not four in a row
    assert done.status is TaskStatus.partial_success and done.envelope is not None, done.envelope
    assert done.envelope["result"] == {"ok": [0, 1, 3]}
    [err] = done.envelope["errors"]
    assert err["type"] == "timeout" and err["step"] == "fan[2]"


async def test_retries_then_success_and_no_retry_of_a_bad_input(harness: Harness) -> None:
    await harness.start()
    ok = f"{harness.kind}-flaky-ok"
    bad = f"{harness.kind}-flaky-bad"
    first = await harness.submit("flaky", {"label": ok, "fail_times": 2})
    second = await harness.submit("flaky", {"label": bad, "fail_times": 5, "error": "bad"})
    done, failed = await harness.wait(first), await harness.wait(second)
    assert done.status is TaskStatus.succeeded and CALLS[ok] == 3, done.envelope
    assert done.envelope is not None and done.envelope["metadata"]["steps"][0]["attempts"] == 3
    assert failed.status is TaskStatus.failed and CALLS[bad] == 1  # a ValueError is not retried
    assert failed.envelope is not None and "bad input" in failed.envelope["errors"][0]["message"]


async def test_cancel_stops_the_running_step_and_keeps_partial_results(harness: Harness) -> None:
    engine = await harness.start()
    label = f"{harness.kind}-cancel"
    task_id = await harness.submit("steps", {"n": 3, "long_s": 30.0, "label": label})
    for _ in range(500):
        if CALLS.get(f"{label}:step-3"):
            break
        await asyncio.sleep(0.02)
    await harness.store.request_cancel(task_id, "t")
    engine.cancel(task_id)
    started = time.monotonic()
    done = await harness.wait(task_id, timeout=20)
    assert time.monotonic() - started < 10
    assert done.status is TaskStatus.cancelled and done.envelope is not None
    assert done.envelope["status"] == "partial_success" and done.envelope["result"] == {"done": [10, 20]}


async def test_a_step_budget_is_a_breaker_that_keeps_partial_results(harness: Harness) -> None:
    await harness.start()
    task_id = await harness.submit("steps", {"n": 4, "label": f"{harness.kind}-budget"}, budget={"max_steps": 2})
    done = await harness.wait(task_id)
    assert done.status is TaskStatus.partial_success and done.envelope is not None
    assert done.envelope["errors"][-1]["type"] == "budget_exceeded"
    assert done.envelope["result"] == {"done": [10, 20]}


async def test_a_write_tool_is_applied_once_through_the_ledger(harness: Harness) -> None:
    await harness.start()
    label = f"{harness.kind}-pay"
    done = await harness.wait(await harness.submit("pay", {"label": label}))
    assert done.status is TaskStatus.succeeded and CALLS[f"{label}:charged"] == 1, done.envelope
    [effect] = await harness.store.list_effects(done.id)
    assert effect.status.value == "applied" and effect.executions == 1


async def test_a_new_engine_resumes_without_running_finished_steps_again(harness: Harness) -> None:
    await harness.start()
    label = f"{harness.kind}-resume"
    task_id = await harness.submit("steps", {"n": 3, "long_s": 2.0, "label": label})
    for _ in range(500):
        if CALLS.get(f"{label}:step-3"):
            break
        await asyncio.sleep(0.02)
    await harness.stop()  # the process goes away while step 3 runs
    await harness.start()
    done = await harness.wait(task_id, timeout=60)
    assert done.status is TaskStatus.succeeded and done.envelope is not None, done.envelope
    assert done.envelope["result"] == {"values": [10, 20, 30]}
    assert CALLS[f"{label}:step-1"] == 1 and CALLS[f"{label}:step-2"] == 1  # never again
    assert CALLS[f"{label}:step-3"] == 2  # interrupted by the stop, then run again to the end
    replayed = {s["name"] for s in done.envelope["metadata"]["steps"] if s["replayed"]}
    assert {"step-1", "step-2"} <= replayed


async def test_a_write_waiting_for_approval_parks_then_resumes_once_approved(harness: Harness) -> None:
    await harness.start()
    label = f"{harness.kind}-approve"
    task_id = await harness.submit("pay", {"label": label}, policy={"approval": "always"})
    parked = await harness.wait(task_id, parked=True)
    assert parked.status is TaskStatus.waiting_for_approval and f"{label}:charged" not in CALLS
    assert parked.envelope is not None and parked.envelope["errors"][0]["type"] == "approval_required"
    [pending] = await harness.store.load_decisions(task_id)
    answer = Decision(
        task_id=task_id, call_id=pending.call_id, kind=pending.kind, tool="", args={}, step="", reason="",
        verdict=Verdict.approve, decided_by="test",
    )  # fmt: skip
    await harness.store.decide(task_id, "t", answer, time.time())
    assert harness.engine is not None
    harness.engine.wake()
    done = await harness.wait(task_id)
    assert done.status is TaskStatus.succeeded and CALLS[f"{label}:charged"] == 1, done.envelope
    [effect] = await harness.store.list_effects(task_id)
    assert effect.status.value == "applied" and effect.executions == 1
