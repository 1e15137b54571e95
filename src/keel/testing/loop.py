"""Proof that work runs off the event loop: count how often the loop gets to run a short sleep meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class LoopTicks:
    """``async with LoopTicks(every=0.01) as loop: await work()``, then ``loop.ticks``: a blocked loop ticks 0 times.

    The ticker is cancelled and awaited on exit, so no task outlives the block."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.ticks += 1

    async def __aenter__(self) -> LoopTicks:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
