"""``GET /metrics``: the app's Prometheus metrics, for a key with the ``metrics`` scope (server-wide figures, so a
tenant's ``admin`` does not imply it: :mod:`keel.scopes`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from keel.interaction.auth import require
from keel.interaction.deps import App, errors
from keel.memory.types import ApiKey
from keel.observability import Observer
from keel.observability.metrics import CONTENT_TYPE

router = APIRouter(tags=["ops"])


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={
        **errors(),  # the scrape is charged to the tenant's request rate like any request: a 429 too
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text exposition format"},
    },
)
async def metrics(request: Request, keel: App, _: Annotated[ApiKey, Depends(require("metrics"))]) -> Response:
    """Counters, gauges and histograms of this process, every name prefixed `keel_`."""
    observer: Observer = request.app.state.observer
    if observer.metrics is None:
        return Response(b"", media_type=CONTENT_TYPE)
    # Read from the store at each scrape: the queue is shared by every process, and only the store knows it.
    observer.metrics.queue_depth.set(await keel.queue_depth())
    observer.metrics.slo(await keel.slo())  # the verdicts come from the shared stats, as for the queue
    body = observer.metrics.render()
    return Response(body, media_type=CONTENT_TYPE)
