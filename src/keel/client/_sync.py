"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from httpx_sse import SSEError, connect_sse

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


class KeelClient:
    """keel's task and document API, typed. Every non-2xx answer raises a :class:`~keel.client.KeelAPIError`
    subclass carrying the problem details; a connection that never answers raises
    :class:`~keel.client.KeelConnectionError`.

    ``base_url`` and ``api_key`` default to ``KEEL_URL`` (else ``http://127.0.0.1:8000``) and ``KEEL_API_KEY``.
    ``http_client`` replaces the client's own ``httpx.Client`` (its base URL and headers are then the caller's);
    ``clock`` and ``sleep`` replace the wall clock for ``wait`` and ``events`` (for tests).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        http_client: httpx.Client | None = None,
        max_reconnects: int = 30,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        url, headers = settings(base_url, api_key)
        self._http = http_client or httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self._owns_http = http_client is None
        self.max_reconnects = max_reconnects
        """Tries in a row without a new event before ``events`` gives up (each waits the server's ``retry:``)."""
        self._clock = clock
        self._sleep = sleep

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def _run(self, call: Call[T]) -> T:
        try:
            response = self._http.send(call.request(self._http))
        except httpx.TransportError as exc:
            raise KeelConnectionError(f"{call.method} {call.path}: {exc!r}") from exc
        return call.parse(response)

    # -- documents -------------------------------------------------------------------------------------------

    def upload(self, file: FileLike, *, filename: str | None = None, password: str | None = None) -> Document:
        """Ingest a file (a path, bytes, or a binary file object) into vector memory. A document that cannot be
        read comes back ``skipped`` with its reason (``document.ingested`` is then false), not as an error."""
        content, name = read_file(file, filename)
        return self._run(Api.upload(content, name, media_type(name), password))

    def ingest_url(self, url: str, *, password: str | None = None) -> Document:
        """Ingest the document at ``url`` (the server fetches it; private addresses are refused)."""
        return self._run(Api.ingest_url(url, password))

    def document(self, document_id: str) -> Document:
        return self._run(Api.document(document_id))

    def delete_document(self, document_id: str) -> None:
        self._run(Api.delete_document(document_id))

    # -- tasks -----------------------------------------------------------------------------------------------

    def submit(
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
        return self._run(
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

    def get(self, task_id: str) -> Task:
        return self._run(Api.get(task_id))

    def list_tasks(
        self, *, status: Sequence[TaskStatus | str] = (), limit: int = 50, cursor: str | None = None
    ) -> TaskPage:
        return self._run(Api.list_tasks(status, limit, cursor))

    def wait(self, task_id: str, *, timeout: float | None = None, stop_at_approval: bool = True) -> Task:
        """Poll until the task is terminal, sleeping what each answer's ``Retry-After`` asks. With
        ``stop_at_approval`` a task parked for a person's decision returns too (it would not move by itself).
        Connection failures, 429 and 5xx are waited out; past ``timeout`` seconds it raises
        :class:`~keel.client.WaitTimeout` with the last state seen."""
        pacer = Pacer(None if timeout is None else self._clock() + timeout)
        last: Task | None = None
        while True:
            try:
                task, asked = self._run(Api.poll(task_id))
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
            self._sleep(pacer.pause(now, asked))

    def events(self, task_id: str, *, after: int = 0) -> Iterator[Event]:
        """The task's events after id ``after``, up to and including ``end``, each exactly once. After a drop
        (a reset, a restart, a minute without even a heartbeat) it reconnects with ``Last-Event-ID`` and goes
        on where it was; it gives up with :class:`~keel.client.StreamInterrupted` after ``max_reconnects``
        tries in a row that bring nothing new."""
        state = Resume(task_id, last_id=after)
        while True:
            try:
                with connect_sse(
                    self._http, "GET", state.path, headers=state.headers(), timeout=STREAM_TIMEOUT
                ) as source:
                    if source.response.is_error:
                        source.response.read()  # the problem body, for the typed error
                    if not state.opened(source.response):
                        return
                    for sse in source.iter_sse():
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
            self._sleep(pause)

    def cancel(self, task_id: str) -> Task:
        """Cancel (idempotent): the running step stops and the partial result is kept."""
        return self._run(Api.cancel(task_id))

    # -- approvals -------------------------------------------------------------------------------------------

    def approvals(self, task_id: str) -> list[Decision]:
        """The calls the task asked a person about: pending ones have ``verdict is None``."""
        return self._run(Api.approvals(task_id))

    def decide(
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
        return self._run(Api.decide(task_id, call_id, decision, note, result))

    def approve(self, task_id: str, call_id: str, *, note: str | None = None) -> Decision:
        return self.decide(task_id, call_id, Verdict.approve, note=note)

    def deny(self, task_id: str, call_id: str, *, note: str | None = None) -> Decision:
        return self.decide(task_id, call_id, Verdict.deny, note=note)
