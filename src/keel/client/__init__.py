"""A typed Python client for keel's REST API, sync (:class:`KeelClient`) and async (:class:`AsyncKeelClient`),
on httpx and httpx-sse.

::

    from keel.client import KeelClient

    with KeelClient() as keel:  # KEEL_URL (default http://127.0.0.1:8000) and KEEL_API_KEY
        doc = keel.upload("vendor-a.pdf")
        task = keel.submit("document_analysis", {"request": "…", "documents": [doc.id]})
        for event in keel.events(task.id):  # resumes with Last-Event-ID after any drop
            print(event.id, event.type)
        print(keel.wait(task.id, timeout=600).envelope)

It needs only keel's base dependencies (httpx, httpx-sse, pydantic) and imports nothing of the server but the
wire enums. Errors: see :mod:`keel.client._errors` for the tree; each carries the RFC 9457 problem details.
"""

from keel.client._async import AsyncKeelClient
from keel.client._errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    KeelAPIError,
    KeelClientError,
    KeelConnectionError,
    NotFound,
    PayloadTooLarge,
    Problem,
    RateLimited,
    ServerError,
    StreamInterrupted,
    Unauthorized,
    WaitTimeout,
)
from keel.client._sync import KeelClient
from keel.client._types import (
    Budget,
    Decision,
    Document,
    Envelope,
    EnvelopeError,
    Event,
    Links,
    Task,
    TaskHandle,
    TaskPage,
    TaskStatus,
    Verdict,
    Webhook,
)

__all__ = [
    "AsyncKeelClient",
    "Budget",
    "Conflict",
    "Decision",
    "Document",
    "Envelope",
    "EnvelopeError",
    "Event",
    "Forbidden",
    "InvalidRequest",
    "KeelAPIError",
    "KeelClient",
    "KeelClientError",
    "KeelConnectionError",
    "Links",
    "NotFound",
    "PayloadTooLarge",
    "Problem",
    "RateLimited",
    "ServerError",
    "StreamInterrupted",
    "Task",
    "TaskHandle",
    "TaskPage",
    "TaskStatus",
    "Unauthorized",
    "Verdict",
    "WaitTimeout",
    "Webhook",
]
