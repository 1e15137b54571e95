"""What the sync and the async client share: every request they can make (:class:`Api`), how an answer becomes a
value or a typed error (:func:`parse`), and the two loops' state (:class:`Pacer` for ``wait``, :class:`Resume`
for ``events``). The clients only send and sleep, so the wire rules live here once."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import httpx
from httpx_sse import ServerSentEvent
from pydantic import BaseModel, TypeAdapter

from keel.client._errors import KeelAPIError, RateLimited, ServerError, api_error, retry_after
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
FileLike = str | os.PathLike[str] | bytes | IO[bytes]
"""What ``upload`` takes: a path, the bytes, or a binary file object."""
M = TypeVar("M", bound=BaseModel)

DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD_TIMEOUT = httpx.Timeout(30, read=900)
"""An upload answers once the document is parsed, OCRed and embedded: a long scan takes minutes."""
STREAM_TIMEOUT = httpx.Timeout(30, read=60)
"""The server sends a heartbeat every 15 s (``KEEL_SSE_HEARTBEAT_S``); a minute of silence is a dead connection."""
RETRYABLE = (RateLimited, ServerError)
"""Answers a loop (``wait``, ``events``) waits out instead of raising: the server asked for time, or failed."""


def settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The base URL and auth headers: the arguments, else ``KEEL_URL`` and ``KEEL_API_KEY``."""
    url = base_url or os.environ.get("KEEL_URL") or DEFAULT_URL
    key = api_key if api_key is not None else os.environ.get("KEEL_API_KEY", "")
    return url.rstrip("/"), ({"Authorization": f"Bearer {key}"} if key else {})


@dataclass(frozen=True, slots=True, kw_only=True)
class Call(Generic[T]):
    """One request, and how its answer becomes a ``T``."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    data: Mapping[str, str] | None = None
    timeout: httpx.Timeout | None = None

    def request(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        extra: dict[str, Any] = {"timeout": self.timeout} if self.timeout is not None else {}
        return client.build_request(
            self.method,
            self.path,
            json=self.json,
            params=self.params,
            headers=dict(self.headers),
            files=self.files,
            data=self.data,
            **extra,
        )


def checked(response: httpx.Response) -> httpx.Response:
    """The response, or the typed error its problem body describes."""
    if response.is_success:
        return response
    raise api_error(response)


def model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.model_validate_json(checked(response).content)


def models(cls: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[cls])  # type: ignore[valid-type]
    return lambda response: list(adapter.validate_json(checked(response).content))


def _handle(response: httpx.Response) -> TaskHandle:
    handle = TaskHandle.model_validate_json(checked(response).content)
    return handle.model_copy(
        update={
            "replayed": response.headers.get("idempotent-replayed") == "true",
            "cached": response.headers.get("cache-status", "").startswith("keel; hit"),
        }
    )


def _task_and_pause(response: httpx.Response) -> tuple[Task, float | None]:
    return model(Task)(response), retry_after(response.headers)


def _nothing(response: httpx.Response) -> None:
    checked(response)


class Api:
    """Every call of keel's task and document API, as data: the clients send them."""

    @staticmethod
    def upload(content: bytes, filename: str, media_type: str, password: str | None) -> Call[Document]:
        return Call(
            method="POST",
            path="/v1/documents",
            files={"file": (filename, content, media_type)},
            data={"password": password} if password else None,
            parse=model(Document),
            timeout=UPLOAD_TIMEOUT,
        )

    @staticmethod
    def ingest_url(url: str, password: str | None) -> Call[Document]:
        body = {"url": url, **({"password": password} if password else {})}
        return Call(method="POST", path="/v1/documents", json=body, parse=model(Document), timeout=UPLOAD_TIMEOUT)

    @staticmethod
    def document(document_id: str) -> Call[Document]:
        return Call(method="GET", path=f"/v1/documents/{document_id}", parse=model(Document))

    @staticmethod
    def delete_document(document_id: str) -> Call[None]:
        return Call(method="DELETE", path=f"/v1/documents/{document_id}", parse=_nothing)

    @staticmethod
    def submit(
        workflow: str,
        input: Mapping[str, Any] | None,
        *,
        budget: Budget | None,
        webhook: Webhook | None,
        metadata: Mapping[str, Any] | None,
        tools: Sequence[str] | None,
        approval: str | None,
        cache_max_age_s: int | None,
        idempotency_key: str | None,
    ) -> Call[TaskHandle]:
        body: dict[str, Any] = {"workflow": workflow, "input": dict(input or {})}
        optional = {
            "budget": budget,
            "webhook": webhook,
            "metadata": dict(metadata) if metadata is not None else None,
            "tools": list(tools) if tools is not None else None,
            "approval": approval,
            "cache": {"max_age_s": cache_max_age_s} if cache_max_age_s is not None else None,
        }
        body |= {k: v for k, v in optional.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Call(method="POST", path="/v1/tasks", json=body, headers=headers, parse=_handle)

    @staticmethod
    def get(task_id: str) -> Call[Task]:
        return Call(method="GET", path=f"/v1/tasks/{task_id}", parse=model(Task))

    @staticmethod
    def poll(task_id: str) -> Call[tuple[Task, float | None]]:
        """``get``, with the ``Retry-After`` the server sent (``wait`` honours it)."""
        return Call(method="GET", path=f"/v1/tasks/{task_id}", parse=_task_and_pause)

    @staticmethod
    def list_tasks(statuses: Sequence[TaskStatus | str], limit: int, cursor: str | None) -> Call[TaskPage]:
        params: dict[str, Any] = {"limit": limit, "status": [str(s) for s in statuses]}
        if cursor:
            params["cursor"] = cursor
        return Call(method="GET", path="/v1/tasks", params=params, parse=model(TaskPage))

    @staticmethod
    def cancel(task_id: str) -> Call[Task]:
        return Call(method="POST", path=f"/v1/tasks/{task_id}/cancel", parse=model(Task))

    @staticmethod
    def approvals(task_id: str) -> Call[list[Decision]]:
        return Call(method="GET", path=f"/v1/tasks/{task_id}/approvals", parse=models(Decision))

    @staticmethod
    def decide(task_id: str, call_id: str, decision: Verdict | str, note: str | None, result: Any) -> Call[Decision]:
        body: dict[str, Any] = {"decision": str(decision)}
        if note is not None:
            body["note"] = note
        if result is not None:
            body["result"] = result
        return Call(method="POST", path=f"/v1/tasks/{task_id}/approvals/{call_id}", json=body, parse=model(Decision))


@dataclass(slots=True)
class Pacer:
    """``wait``'s clock: how long to sleep before the next poll, and when to give up."""

    deadline: float | None
    """On the client's monotonic clock; ``None`` waits for ever."""
    default_s: float = 1.0
    """When the server names no interval (it always does while a task runs)."""

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def pause(self, now: float, asked: float | None) -> float:
        """The server's ``Retry-After`` (or the default), cut short so as not to sleep past the deadline."""
        pause = self.default_s if asked is None else asked
        return pause if self.deadline is None else max(0.0, min(pause, self.deadline - now))


@dataclass(slots=True)
class Resume:
    """``events``' memory across reconnects: the last id delivered (sent back as ``Last-Event-ID``, and the
    guard against a duplicate), the server's ``retry:`` interval, and the failures since the last new event."""

    task_id: str
    last_id: int = 0
    retry_s: float = 2.0
    failures: int = 0
    ended: bool = False

    @property
    def path(self) -> str:
        return f"/v1/tasks/{self.task_id}/events"

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": str(self.last_id)} if self.last_id else {}

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The frame as an event, once: ``None`` for the ``retry:`` preamble and for anything already delivered."""
        if sse.retry is not None:
            self.retry_s = sse.retry / 1000
        if not sse.id.isdigit() or (not sse.data and sse.event == "message"):
            return None
        seq = int(sse.id)
        if seq <= self.last_id:
            return None
        self.last_id, self.failures = seq, 0
        event = Event.of(seq, sse.event, sse.data)
        self.ended = event.type == "end"
        return event

    def opened(self, response: httpx.Response) -> bool:
        """Whether there is a stream to read: 204 means the task is finished and nothing follows ``last_id``."""
        if response.status_code == 204:
            self.ended = True
            return False
        checked(response)
        return True

    def broke(self, exc: Exception, max_failures: int) -> float | None:
        """A dropped or refused connection: the pause before the next try (the server's ``Retry-After`` for a
        429/5xx, else its ``retry:``), or ``None`` once ``max_failures`` tries in a row have failed."""
        self.failures += 1
        if self.failures > max_failures:
            return None
        asked = exc.retry_after if isinstance(exc, KeelAPIError) else None
        return self.retry_s if asked is None else asked


def media_type(filename: str) -> str:
    """What an upload declares; the server sniffs the bytes anyway."""
    lowered = filename.lower()
    if lowered.endswith(".pdf"):
        return "application/pdf"
    if lowered.endswith((".txt", ".md")):
        return "text/plain"
    if lowered.endswith((".html", ".htm")):
        return "text/html"
    return "application/octet-stream"


def read_file(file: FileLike, filename: str | None) -> tuple[bytes, str]:
    """The bytes to upload and the name to give them."""
    if isinstance(file, bytes):
        return file, filename or "document"
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        return path.read_bytes(), filename or path.name
    name = getattr(file, "name", None)
    return file.read(), filename or (Path(name).name if isinstance(name, str) else "document")
