"""One observation seam: the engine and the edge say what happened, once, and the consumers turn it into
Prometheus metrics (:mod:`keel.observability.metrics`, always) and OpenTelemetry spans
(:mod:`keel.observability.tracing`, only with the ``otel`` extra and an exporter).

A call site is one line: ``observability.current().step(...)``. The observer is ambient (a context variable) rather
than passed down, because a task runs much later than it is submitted, in a worker that both engines start:
:func:`keel.app.running` sets it before the engine starts (its workers inherit it) and the HTTP middleware sets it
for every request. Each app has its own observer and its own Prometheus registry, so apps in one process (tests)
never share counters. With no observer set, every call is a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.observability.metrics import Metrics

if TYPE_CHECKING:
    from keel.memory.types import ModelCallRecord, OutboxMessage, Task, TaskStatus
    from keel.observability.tracing import Tracing

__all__ = ["Metrics", "Observer", "StepSeen", "TaskSeen", "current", "from_env", "use"]

log = logging.getLogger("keel.observability")

TRACEPARENT = "traceparent"
"""The W3C Trace Context header, and the key under which a task's metadata carries its submitter's trace."""


@dataclass(kw_only=True, slots=True)
class TaskSeen:
    """What the runner tells about one run while it goes: how it ended (None: handed back unfinished)."""

    status: TaskStatus | None = None


@dataclass(kw_only=True, slots=True)
class StepSeen:
    """What the context tells about one executed step once it is done: its tries and its recorded error."""

    tries: int = 1
    error: dict[str, Any] | None = None


@dataclass(kw_only=True)
class Observer:
    """The seam. ``metrics`` is None only for the no-op observer; ``tracing`` is None without the ``otel`` extra
    or without an exporter."""

    metrics: Metrics | None = field(default_factory=Metrics)
    tracing: Tracing | None = None

    # -- tasks ---------------------------------------------------------------------------------------------------

    def carry(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """A new task's metadata, with the submitting request's trace context when tracing: the run happens later,
        in a worker, and its span joins the request's trace through it."""
        if self.tracing is None:
            return metadata
        parent = self.tracing.traceparent()
        return {**metadata, TRACEPARENT: parent} if parent else metadata

    def task_created(self, workflow: str) -> None:
        if self.metrics is not None:
            self.metrics.tasks_created.labels(workflow).inc()

    @contextlib.contextmanager
    def task_run(self, task: Task) -> Iterator[TaskSeen]:
        """Around one run of a task: its span (a child of the submitting request's, carried in its metadata) and,
        once it has ended, its duration and status."""
        seen = TaskSeen()
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if self.tracing is not None:
                stack.enter_context(self.tracing.task_span(task, seen))
            yield seen
        if self.metrics is not None and seen.status is not None:
            self.metrics.tasks_finished.labels(task.workflow, seen.status.value).inc()
            self.metrics.task_duration.labels(task.workflow).observe(time.perf_counter() - started)

    def stamp(self, envelope_metadata: dict[str, Any]) -> None:
        """Put the run's trace context in its envelope's metadata, where its webhook delivery finds it."""
        if self.tracing is not None:
            parent = self.tracing.traceparent()
            if parent:
                envelope_metadata[TRACEPARENT] = parent

    def budget_tripped(self, budget: str) -> None:
        if self.metrics is not None:
            self.metrics.budget_trips.labels(budget).inc()

    # -- steps, model and tool calls -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, key: str, kind: str, fn_id: str) -> Iterator[StepSeen]:
        """Around one executed step (never a replayed one): its span, a tool span inside it for a tool call, and
        its duration, retries and outcome."""
        seen = StepSeen()
        started = time.perf_counter()
        status = "stopped"  # cancelled, or stopped by a breaker or a lost lease: never recorded
        try:
            with contextlib.ExitStack() as stack:
                if self.tracing is not None:
                    stack.enter_context(self.tracing.step_span(key, kind, fn_id, seen))
                yield seen
            status = "failed" if seen.error is not None else "succeeded"
        finally:
            if self.metrics is not None:
                self.metrics.step_duration.labels(kind, status).observe(time.perf_counter() - started)
                if seen.tries > 1:
                    self.metrics.step_retries.labels(kind).inc(seen.tries - 1)
                if kind == "tool":
                    self.metrics.tool_calls.labels(fn_id.removeprefix("tool:"), status).inc()

    def model_call(self, call: ModelCallRecord) -> None:
        """One model call, as it is recorded for the envelope and the per-model counters."""
        if self.metrics is not None:
            self.metrics.model_call(call)
        if self.tracing is not None:
            self.tracing.model_span(call)

    # -- the edge ------------------------------------------------------------------------------------------------

    def outgoing_headers(self) -> dict[str, str]:
        """``traceparent`` for a downstream HTTP call made now (a tool's fetch), when tracing."""
        if self.tracing is None:
            return {}
        parent = self.tracing.traceparent()
        return {TRACEPARENT: parent} if parent else {}

    def webhook_headers(self, msg: OutboxMessage) -> dict[str, str]:
        """``traceparent`` for a webhook delivery: the trace of the run that queued it (from its envelope)."""
        if self.tracing is None:
            return {}
        envelope = (msg.payload.get("data") or {}).get("envelope") or {}
        parent = (envelope.get("metadata") or {}).get(TRACEPARENT)
        return {TRACEPARENT: parent} if isinstance(parent, str) and parent else {}

    def webhook_delivered(self, outcome: str) -> None:
        """``outcome``: delivered, retry, dead or disabled."""
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(outcome).inc()
            if outcome != "delivered":
                self.metrics.webhook_failures.inc()

    def retention_deleted(self, tier: str, count: int) -> None:
        """The sweeper deleted ``count`` expired rows of a memory tier (tasks, sessions, chunks,
        idempotency_keys)."""
        if self.metrics is not None and count:
            self.metrics.retention_deleted.labels(tier).inc(count)

    @contextlib.contextmanager
    def stream_open(self) -> Iterator[None]:
        """While an SSE stream is open."""
        if self.metrics is None:
            yield
            return
        self.metrics.open_streams.inc()
        try:
            yield
        finally:
            self.metrics.open_streams.dec()

    def shutdown(self) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()


NOOP = Observer(metrics=None)
_current: contextvars.ContextVar[Observer] = contextvars.ContextVar("keel_observer", default=NOOP)


def current() -> Observer:
    """The observer of the app this code runs for (the no-op one outside any app)."""
    return _current.get()


@contextlib.contextmanager
def use(observer: Observer) -> Iterator[None]:
    """Make ``observer`` current here and in every task started inside (the engine's workers, the dispatchers)."""
    token = _current.set(observer)
    try:
        yield
    finally:
        _current.reset(token)


def from_env() -> Observer:
    """The observer an app gets by default: metrics, and spans when ``OTEL_EXPORTER_OTLP_ENDPOINT`` says where to
    send them and the ``otel`` extra is installed (without both, nothing of OpenTelemetry's SDK is imported)."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return Observer()
    try:
        from keel.observability.tracing import Tracing
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed: pip install 'keel-runtime[otel]'"
        )
        return Observer()
    return Observer(tracing=Tracing.otlp())
