"""``GET /metrics``: the app's Prometheus metrics, for a key with the ``metrics`` (or ``admin``) scope."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from keel.interaction.auth import require
from keel.memory.types import ApiKey
from keel.observability import Observer
from keel.observability.metrics import CONTENT_TYPE

router = APIRouter(tags=["ops"])


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text exposition format"}},
)
async def metrics(request: Request, _: Annotated[ApiKey, Depends(require("metrics"))]) -> Response:
    """Counters, gauges and histograms of this process, every name prefixed `keel_`."""
    observer: Observer = request.app.state.observer
    body = observer.metrics.render() if observer.metrics is not None else b""
    return Response(body, media_type=CONTENT_TYPE)
