"""The engine seam: what runs workflows durably (a queue, leases, checkpoints, resumption).

The embedded engine (:class:`keel.orchestration.engine.runtime.EmbeddedEngine`: the SQLite store and in-process workers)
is the default. A distributed engine plugs in behind the same four methods; workflows never notice, because
they only ever see their :class:`~keel.orchestration.engine.context.WorkflowContext`.

What an engine builds on is public: :class:`~keel.orchestration.engine.runner.TaskQueue` leases queued tasks,
:class:`~keel.orchestration.engine.runner.TaskRunner` runs one and ends it through the engine's
:class:`~keel.orchestration.engine.runner.RunHost`, and a :class:`~keel.orchestration.engine.context.StepRunner` may run
each step elsewhere (``StepCall.attempt``, ``step_scope``, ``PendingStep.checkpoint``, ``WorkflowContext.settle``).
Temporal (:mod:`keel.backends.temporal`) uses nothing else.
"""

from __future__ import annotations

from typing import Protocol


class Engine(Protocol):
    async def start(self, *, recover: bool = True) -> None:
        """Start running queued work; with ``recover``, first take back work a dead process left running."""
        ...

    async def stop(self) -> None:
        """Stop gracefully: in-flight runs are interrupted and handed back to the queue, never lost."""
        ...

    def wake(self) -> None:
        """A task was just queued: look now instead of at the next poll."""
        ...

    def cancel(self, task_id: str) -> None:
        """Cancel a running task promptly (cancellation reaches the in-flight step)."""
        ...
