"""The circuit breaker of fallback chains, on the embedded engine with scripted models and an injected clock:
a failing primary opens, the backup answers without the primary being asked, and the primary comes back through
half-open probes; a chain whose every model is open fails fast; and each failed model is recorded as itself."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from keel.errors import ModelHTTPError
from keel.memory.types import NewTask, Task, TaskStatus
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.retry import RetryPolicy
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import WorkflowRegistry, workflow
from keel.orchestration.llm.models import Message, ModelRegistry
from keel.orchestration.llm.models.circuit import CircuitBreaker, CircuitState
from keel.orchestration.llm.models.fallback import FallbackModel
from keel.testing.inmemory import InMemoryStore
from keel.testing.models import AgentInfo, FunctionModel

FAST = RetryPolicy(max_attempts=1)


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """A scripted provider: answers, or fails with 529 (Anthropic's 'overloaded') while ``down``."""

    def __init__(self, name: str) -> None:
        self.down = False
        self.model = FunctionModel(self.reply, name=name)

    def reply(self, messages: list[Message], info: AgentInfo) -> str:
        if self.down:
            raise ModelHTTPError("test", 529, '{"type": "overloaded_error"}')
        return f"answer from {self.model.name}"

    @property
    def asked(self) -> int:
        return len(self.model.calls)


class Empty(BaseModel):
    pass


class Harness:
    def __init__(self, **breaker: Any) -> None:
        self.clock = Clock()
        self.breaker = CircuitBreaker(thresholds={"error": 0.05}, cooldown_s=60, probes=2, min_calls=3,
                                      clock=self.clock, **breaker)  # fmt: skip
        self.primary, self.backup = Flaky("test:primary"), Flaky("test:backup")
        self.chain = FallbackModel([self.primary.model, self.backup.model], breaker=self.breaker)
        self.store = InMemoryStore()
        registry = WorkflowRegistry()
        chain = self.chain

        @workflow(name="ask")
        async def ask(ctx: WorkflowContext, _: Empty) -> Any:
            return await ctx.generate("answer", chain, "Risks?", retry=FAST, stream=False)

        registry.register(ask)
        self.engine = EmbeddedEngine(
            self.store, registry, poll_s=0.01, models=ModelRegistry("test", breaker=self.breaker)
        )

    async def run(self) -> Task:
        created = await self.store.create_task(NewTask(tenant="acme", workflow="ask", input={}), None, time.time())
        assert created.task
        for _ in range(500):
            task = await self.store.get_task(created.task.id)
            assert task
            if task.status.terminal:
                return task
            await asyncio.sleep(0.01)
        raise AssertionError("the task did not finish")

    async def circuit_events(self, task: Task) -> list[tuple[str, str, str]]:
        return [
            (e.data["model_id"], e.data["previous"], e.data["state"])
            for e in await self.store.read(task.id, 0, 1000)
            if e.type == "model_circuit"
        ]


def calls(task: Task) -> list[tuple[str, str]]:
    assert task.envelope
    return [(c["requested_model"], c["outcome"]) for c in task.envelope["metadata"]["model_calls"]]


async def test_a_failing_primary_opens_and_comes_back_through_half_open_probes() -> None:
    h = Harness()
    await h.engine.start()
    try:
        h.primary.down = True
        for _ in range(3):  # every call tries the primary first, and says so
            task = await h.run()
            assert task.status is TaskStatus.succeeded and task.envelope
            assert task.envelope["result"] == "answer from test:backup"
            assert calls(task) == [("test:primary", "http_529"), ("test:backup", "ok")]
            assert await h.circuit_events(task) == []
        assert h.primary.asked == 3
        [backup_row, primary_row] = await h.store.model_stats()  # by model id
        assert (primary_row.model_id, primary_row.calls, primary_row.errors) == ("test:primary", 3, 3)
        assert (backup_row.model_id, backup_row.calls, backup_row.errors) == ("test:backup", 3, 0)

        # 3 errors in 3 calls: the error rate's whole interval is above 5%. The next call opens the circuit and
        # the backup answers without the primary being asked.
        task = await h.run()
        assert task.status is TaskStatus.succeeded and h.primary.asked == 3
        assert calls(task) == [("test:primary", "skipped"), ("test:backup", "ok")]
        assert task.envelope
        skipped, answered = task.envelope["metadata"]["model_calls"]
        assert skipped["circuit"] == "open" and skipped["verdicts"] == {"error": "violated"}
        assert "error 1.000" in skipped["reason"] and "above 0.05" in skipped["reason"]
        assert answered["fallback"] is True
        assert await h.circuit_events(task) == [("test:primary", "closed", "open")]

        h.primary.down = False  # it recovers, but nobody asks it during the cooldown
        h.clock.now += 59
        task = await h.run()
        assert calls(task) == [("test:primary", "skipped"), ("test:backup", "ok")] and h.primary.asked == 3

        h.clock.now += 2  # the cooldown is over: one probe at a time
        task = await h.run()
        assert calls(task) == [("test:primary", "ok")] and h.primary.asked == 4
        assert await h.circuit_events(task) == [("test:primary", "open", "half_open")]
        assert h.breaker.state("test", "test:primary") is CircuitState.half_open
        task = await h.run()  # the second probe in a row closes it
        assert calls(task) == [("test:primary", "ok")]
        assert await h.circuit_events(task) == [("test:primary", "half_open", "closed")]
        backup_asked = h.backup.asked
        task = await h.run()  # closed, with its counts afresh: the old failures do not open it again
        assert calls(task) == [("test:primary", "ok")] and h.backup.asked == backup_asked
        assert await h.circuit_events(task) == []
    finally:
        await h.engine.stop()


async def test_a_failed_probe_opens_the_circuit_again() -> None:
    h = Harness()
    await h.engine.start()
    try:
        h.primary.down = True
        for _ in range(4):
            await h.run()
        assert h.breaker.state("test", "test:primary") is CircuitState.open
        h.clock.now += 61
        task = await h.run()  # the probe fails: open again, for another cooldown
        assert calls(task) == [("test:primary", "http_529"), ("test:backup", "ok")]
        assert await h.circuit_events(task) == [
            ("test:primary", "open", "half_open"),
            ("test:primary", "half_open", "open"),
        ]
        h.clock.now += 30
        task = await h.run()
        assert calls(task) == [("test:primary", "skipped"), ("test:backup", "ok")] and h.primary.asked == 4
    finally:
        await h.engine.stop()


async def test_a_chain_whose_every_model_is_open_fails_fast_with_model_unavailable() -> None:
    h = Harness()
    await h.engine.start()
    try:
        h.primary.down = h.backup.down = True
        for _ in range(3):
            task = await h.run()
            assert task.status is TaskStatus.failed and task.envelope
            assert task.envelope["errors"][0]["type"] == "upstream_error"
        asked = (h.primary.asked, h.backup.asked)
        task = await h.run()
        assert (h.primary.asked, h.backup.asked) == asked  # nobody was asked
        assert task.status is TaskStatus.failed and task.envelope
        [error] = task.envelope["errors"]
        assert error["type"] == "model_unavailable"
        assert "test:test:primary" in error["message"] and "test:test:backup" in error["message"]
        assert error["message"].count("error 1.000") == 2
        assert [s for _, s in calls(task)] == ["skipped", "skipped"]
        assert [e[2] for e in await h.circuit_events(task)] == ["open", "open"]
    finally:
        await h.engine.stop()


async def test_concurrent_workers_send_one_probe_at_a_time() -> None:
    breaker = CircuitBreaker(thresholds={"error": 0.05}, cooldown_s=10, probes=1, min_calls=1, clock=Clock())
    from keel.memory.types import ModelCallRecord

    breaker.record(ModelCallRecord(provider="p", requested_model="m", model_id="m", error=True, at=1.0))
    assert not breaker.admit("p", "m").allowed  # opens
    breaker.clock.now += 11  # type: ignore[attr-defined]
    first, second = breaker.admit("p", "m"), breaker.admit("p", "m")
    assert first.allowed and first.probe and not second.allowed and "probe is in flight" in second.reason
    breaker.release("p", "m")  # the probe was cancelled: the next call may probe
    assert breaker.admit("p", "m").probe


def test_without_thresholds_the_breaker_never_opens() -> None:
    from keel.memory.types import ModelCallRecord

    breaker = CircuitBreaker(thresholds={"json_valid": 0.97, "refusal": 0.1}, clock=Clock())
    assert set(breaker.thresholds) == {"json_valid"}  # refusals are the prompt's business, not the provider's
    for _ in range(50):
        breaker.record(ModelCallRecord(provider="p", requested_model="m", model_id="m", error=True, at=1.0))
    assert breaker.admit("p", "m").allowed


@pytest.mark.parametrize("valid", [True, False])
def test_invalid_json_opens_the_circuit(valid: bool) -> None:
    from keel.memory.types import ModelCallRecord

    breaker = CircuitBreaker(thresholds={"json_valid": 0.97}, min_calls=5, clock=Clock())
    for _ in range(200):  # 200 of 200: the interval's low end (0.981) clears 0.97
        breaker.record(
            ModelCallRecord(provider="p", requested_model="m", model_id="m", json_valid=valid, schema_valid=valid)
        )
    admission = breaker.admit("p", "m")
    assert admission.allowed is valid
    assert admission.verdicts == {"json_valid": "ok" if valid else "violated"}


def test_every_replicas_calls_open_a_circuit_but_not_again_after_it_closed() -> None:
    from keel.memory.types import ModelCallRecord, ModelWindow

    clock = Clock()
    breaker = CircuitBreaker(thresholds={"error": 0.05}, cooldown_s=10, probes=1, min_calls=3, clock=clock)
    elsewhere = ModelWindow(provider="p", model_id="m")
    for _ in range(6):  # another replica's failures, as the shared stats hold them
        elsewhere.add(ModelCallRecord(provider="p", requested_model="m", model_id="m", error=True).window_counts(), -1)
    breaker.observe_shared([elsewhere], since=clock.now - 300)
    admission = breaker.admit("p", "m")
    assert not admission.allowed and admission.reason.startswith("across replicas: error 1.000")
    assert admission.verdicts == {"error": "violated"}  # this process has no calls of its own: the shared say so
    clock.now += 11
    assert breaker.admit("p", "m").probe
    assert breaker.settle("p", "m", ok=True) is not None  # closed
    assert breaker.admit("p", "m").allowed  # the snapshot reaches back before the close: not counted again
    breaker.observe_shared([elsewhere], since=clock.now + 1)  # a later snapshot that still shows failures
    assert not breaker.admit("p", "m").allowed


async def test_a_failed_read_of_the_shared_stats_keeps_the_last_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    from keel.memory.types import ModelCallRecord

    store = InMemoryStore()
    clock = Clock(now=time.time())
    breaker = CircuitBreaker(thresholds={"error": 0.05}, min_calls=3, clock=clock)
    failed = ModelCallRecord(provider="p", requested_model="m", model_id="m", error=True, at=clock.now - 10)
    for _ in range(3):
        await store.record_model_call("t", failed)
    await breaker.refresh(store, shared_s=300)
    await store.aclose()

    async def broken(since: float) -> list[Any]:
        raise OSError("the database is down")

    store.model_window = broken  # type: ignore[method-assign]
    await breaker.refresh(store, shared_s=300)
    assert "could not read the shared model stats: the database is down" in caplog.text
    assert not breaker.admit("p", "m").allowed  # still judged on the last snapshot
