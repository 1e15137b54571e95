"""Server-sent events from a task's durable event log.

The framing is a pure encoder (:func:`frame`, :func:`frames`): events in, SSE frames out, testable without a
server. The events come from :meth:`keel.service.Keel.events`; :func:`event_response` only puts the two together.
``id:`` is the event's sequence number, so a client whose connection drops resumes at
``GET /v1/tasks/{id}/events`` with ``Last-Event-ID`` and loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from keel import observability
from keel.errors import InputError
from keel.memory.types import Event
from keel.service import Keel

MAX_EVENT_ID = 2**63 - 1
"""The largest sequence number an event log holds: a signed 64-bit integer in SQLite and Postgres."""


def event_id(value: str) -> int:
    """A ``Last-Event-ID`` as a sequence number. An id the log cannot have issued (not ASCII digits, or past a
    64-bit integer) is the client's mistake, refused here as a 422 before a store is asked (where a huge one
    would overflow the driver's integer and become a 500). Every edge that resumes a stream parses it here."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_EVENT_ID)) or int(text) > MAX_EVENT_ID:
        raise InputError("Last-Event-ID must be an event sequence number")
    return int(text)


def frame(event: Event) -> ServerSentEvent:
    """One event as one SSE frame: ``id:`` its sequence number, ``event:`` its type, ``data:`` its JSON."""
    return ServerSentEvent(id=str(event.seq), event=event.type, data=json.dumps(event.data))


async def frames(events: AsyncIterator[Event], *, retry_ms: int) -> AsyncIterator[ServerSentEvent]:
    """``retry:`` first (how long a client waits before reconnecting), then one frame per event."""
    with observability.current().stream_open():
        yield ServerSentEvent(comment="keel event stream", retry=retry_ms)
        async for event in events:
            yield frame(event)


def event_response(
    keel: Keel, task_id: str, after: int = 0, headers: dict[str, str] | None = None
) -> EventSourceResponse:
    """The task's events after sequence number ``after``, up to and including ``end``, as ``text/event-stream``
    (with heartbeat comments, so proxies keep the connection open)."""
    settings = keel.settings
    return EventSourceResponse(
        frames(keel.events(task_id, after), retry_ms=settings.sse_retry_ms),
        headers=headers,
        ping=settings.sse_heartbeat_s,
        send_timeout=30,
    )
