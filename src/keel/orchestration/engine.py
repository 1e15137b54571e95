"""The engine seam: what runs workflows durably (a queue, leases, checkpoints, resumption).

The embedded engine (:class:`keel.orchestration.runtime.EmbeddedEngine`: the SQLite store and in-process workers)
is the default. A distributed engine plugs in behind the same four methods; workflows never notice, because
they only ever see their :class:`~keel.orchestration.context.WorkflowContext`.
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
