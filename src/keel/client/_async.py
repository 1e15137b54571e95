"""The asynchronous client: :class:`~keel.client.KeelClient`'s surface, every method awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from httpx_sse import SSEError, aconnect_sse

from keel.client._core import (
    RETRYABLE,
    STREAM_TIMEOUT,
    Api,
    Call,
    FileLike,
    Pacer,
    Resume,
    media_type,
    read_file,
    settings,
)
from keel.client._errors import KeelAPIError, KeelConnectionError, StreamInterrupted, WaitTimeout
from keel.client._types import (
    Budget,
    Decision,
    Document,
    Event,
    Task,
    TaskHandle,
    TaskPage,
    TaskStatus,
    Verdict,
    Webhook,
)

T = TypeVar("T")


class AsyncKeelClient:
    """keel's task and document API, typed and awaitable: :class:`~keel.client.KeelClient`'s methods. Every
    non-2xx answer raises a :class:`~keel.client.KeelAPIError` subclass carrying the problem details; a connection
    that never answers raises :class:`~keel.client.KeelConnectionError`.

    ``base_url`` and ``api_key`` default to ``KEEL_URL`` (else ``http://127.0.0.1:8000``) and ``KEEL_API_KEY``.
    ``http_client`` replaces the client's own ``httpx.AsyncClient`` (its base URL and headers are then the
    caller's); ``clock`` and ``sleep`` replace the wall clock for ``wait`` and ``events`` (for tests).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
        max_reconnects: int = 30,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        url, headers = settings(base_url, api_key)
        self._http = http_client or httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)
        self._owns_http = http_client is None
        self.max_reconnects = max_reconnects
        """Tries in a row without a new event before ``events`` gives up (each waits the server's ``retry:``)."""
        self._clock = clock
        self._sleep = sleep

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _run(self, call: Call[T]) -> T:
        try:
            response = await self._http.send(call.request(self._http))
        except httpx.TransportError as exc:
            raise KeelConnectionError(f"{call.method} {call.path}: {exc!r}") from exc
        return call.parse(response)

    # -- documents -------------------------------------------------------------------------------------------

    async def upload(self, file: FileLike, *, filename: str | None = None, password: str | None = None) -> Document:
        """Ingest a file (a path, bytes, or a binary file object) into vector memory. A document that cannot be
        read comes back ``skipped`` with its reason (``document.ingested`` is then false), not as an error."""
        content, name = await asyncio.to_thread(read_file, file, filename)  # off the event loop
        return await self._run(Api.upload(content, name, media_type(name), password))

    async def ingest_url(self, url: str, *, password: str | None = None) -> Document:
        """Ingest the document at ``url`` (the server fetches it; private addresses are refused)."""
        return await self._run(Api.ingest_url(url, password))

    async def document(self, document_id: str) -> Document:
        return await self._run(Api.document(document_id))

    async def delete_document(self, document_id: str) -> None:
        await self._run(Api.delete_document(document_id))

    # -- tasks -----------------------------------------------------------------------------------------------

    async def submit(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        budget: Budget | None = None,
        webhook: Webhook | None = None,
        metadata: Mapping[str, Any] | None = None,
        tools: Sequence[str] | None = None,
        approval: str | None = None,
        cache_max_age_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle:
        """Submit a task: stored durably before this returns. The same ``idempotency_key`` with the same body
        returns the same task (``replayed``); with a different body it raises ``InvalidRequest``."""
        return await self._run(
            Api.submit(
                workflow,
                input,
                budget=budget,
                webhook=webhook,
                metadata=metadata,
                tools=tools,
                approval=approval,
                cache_max_age_s=cache_max_age_s,
                idempotency_key=idempotency_key,
            )
        )

    async def get(self, task_id: str) -> Task:
        return await self._run(Api.get(task_id))

    async def list_tasks(
        self, *, status: Sequence[TaskStatus | str] = (), limit: int = 50, cursor: str | None = None
    ) -> TaskPage:
        return await self._run(Api.list_tasks(status, limit, cursor))

    async def wait(self, task_id: str, *, timeout: float | None = None, stop_at_approval: bool = True) -> Task:
        """Poll until the task is terminal, sleeping what each answer's ``Retry-After`` asks. With
        ``stop_at_approval`` a task parked for a person's decision returns too (it would not move by itself).
        Connection failures, 429 and 5xx are waited out; past ``timeout`` seconds it raises
        :class:`~keel.client.WaitTimeout` with the last state seen."""
        pacer = Pacer(None if timeout is None else self._clock() + timeout)
        last: Task | None = None
        while True:
            try:
                task, asked = await self._run(Api.poll(task_id))
                last = task
                if task.settled if stop_at_approval else task.status.terminal:
                    return task
            except (KeelConnectionError, *RETRYABLE) as exc:
                asked = exc.retry_after if isinstance(exc, KeelAPIError) else None
                if last is None and pacer.expired(self._clock()):
                    raise  # not one answer: the failure says more than a timeout would
            now = self._clock()
            if last is not None and pacer.expired(now):
                raise WaitTimeout(last, timeout or 0.0)
            await self._sleep(pacer.pause(now, asked))

    async def events(self, task_id: str, *, after: int = 0) -> AsyncIterator[Event]:
        """The task's events after id ``after``, up to and including ``end``, each exactly once. After a drop
        (a reset, a restart, a minute without even a heartbeat) it reconnects with ``Last-Event-ID`` and goes
        on where it was; it gives up with :class:`~keel.client.StreamInterrupted` after ``max_reconnects``
        tries in a row that bring nothing new."""
        state = Resume(task_id, last_id=after)
        while True:
            try:
                async with aconnect_sse(
                    self._http, "GET", state.path, headers=state.headers(), timeout=STREAM_TIMEOUT
                ) as source:
                    if source.response.is_error:
                        await source.response.aread()  # the problem body, for the typed error
                    if not state.opened(source.response):
                        return
                    async for sse in source.aiter_sse():
                        event = state.accept(sse)
                        if event is not None:
                            yield event
                            if state.ended:
                                return
                failure: Exception = ConnectionError("the stream closed before its end")  # a graceful shutdown
            except (httpx.TransportError, SSEError, *RETRYABLE) as exc:
                failure = exc
            pause = state.broke(failure, self.max_reconnects)
            if pause is None:
                raise StreamInterrupted(task_id, state.last_id, self.max_reconnects) from failure
            await self._sleep(pause)

    async def cancel(self, task_id: str) -> Task:
        """Cancel (idempotent): the running step stops and the partial result is kept."""
        return await self._run(Api.cancel(task_id))

    # -- approvals -------------------------------------------------------------------------------------------

    async def approvals(self, task_id: str) -> list[Decision]:
        """The calls the task asked a person about: pending ones have ``verdict is None``."""
        return await self._run(Api.approvals(task_id))

    async def decide(
        self,
        task_id: str,
        call_id: str,
        decision: Verdict | str,
        *,
        note: str | None = None,
        result: Any = None,
    ) -> Decision:
        """Answer a parked call: ``approve``, ``deny``, or ``applied`` (an interrupted write did happen; ``result``
        is what it returned). Needs the ``tasks:approve`` scope."""
        return await self._run(Api.decide(task_id, call_id, decision, note, result))

    async def approve(self, task_id: str, call_id: str, *, note: str | None = None) -> Decision:
        return await self.decide(task_id, call_id, Verdict.approve, note=note)

    async def deny(self, task_id: str, call_id: str, *, note: str | None = None) -> Decision:
        return await self.decide(task_id, call_id, Verdict.deny, note=note)
