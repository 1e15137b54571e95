"""The task API: submit (202), poll (Retry-After), list, stream (SSE), cancel."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response

from keel.errors import InputError
from keel.interaction.auth import Operator, Reader, Writer
from keel.interaction.deps import App, errors, problem
from keel.interaction.openapi import EventStream, event_stream
from keel.interaction.schemas import (
    ModelStatsView,
    SloView,
    SubmitTask,
    TaskAccepted,
    TaskPage,
    TaskView,
    accepted,
    view,
)
from keel.interaction.sse import MAX_EVENT_ID, event_id, event_response
from keel.interaction.wire_json import render
from keel.memory.types import ApiKey, TaskStatus
from keel.service import Idempotency, Keel, Submitted

router = APIRouter(prefix="/v1")
TASKS: list[str | Enum] = ["tasks"]
ERRORS = errors("No such task for this tenant")

IdempotencyKey = Annotated[
    str | None, Header(max_length=255, description="Retries with the same key return the same task.")
]


async def submit_task(keel: Keel, key: ApiKey, body: SubmitTask, idempotency_key: str | None) -> Submitted:
    """A REST body submitted: the service does the work; the ``Idempotency-Key`` header holds for this body."""
    idempotency = None
    if idempotency_key is not None:
        canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        idempotency = Idempotency.of("rest", idempotency_key, hashlib.sha256(canonical.encode()).hexdigest())
    return await keel.submit(key, body.submission(), idempotency)


def submitted_headers(submitted: Submitted) -> dict[str, str]:
    """``Location``, and ``Idempotent-Replayed`` for a replay or the cache headers for a cached answer."""
    headers = {"Location": f"/v1/tasks/{submitted.task.id}"}
    if submitted.outcome == "replayed":
        headers["Idempotent-Replayed"] = "true"
    elif submitted.outcome == "cached":
        headers |= {"Cache-Status": "keel; hit", "Age": str(submitted.age_s)}
    return headers


@router.post(
    "/tasks",
    status_code=202,
    response_model=TaskAccepted,
    responses={
        **ERRORS,
        200: {
            "model": TaskView,
            "description": "Answered from the result cache (`cache.max_age_s` allowed it): the earlier task",
        },
        409: problem("A request with this Idempotency-Key is still in flight"),
        413: problem("Body too large"),
        422: problem("Invalid body, or Idempotency-Key reused with a different body"),
    },
    summary="Submit a task",
    operation_id="submitTask",
    tags=TASKS,
)
async def submit(body: SubmitTask, keel: App, key: Writer, idempotency_key: IdempotencyKey = None) -> Response:
    """Validate, store durably, and return 202 with the task's handle. Nothing is stored if validation fails."""
    submitted = await submit_task(keel, key, body, idempotency_key)
    cached = submitted.outcome == "cached"
    payload = view(submitted.task) if cached else accepted(submitted.task)
    return render(payload, status_code=200 if cached else 202, headers=submitted_headers(submitted))


@router.get("/workflows", responses=errors(), summary="List workflows", operation_id="listWorkflows", tags=TASKS)
async def list_workflows(keel: App, key: Reader) -> list[dict[str, Any]]:
    """Every workflow `POST /v1/tasks` accepts, with its description and the JSON Schema of its `input` (with
    examples where the workflow gives them): what a client needs to build a valid request without guessing."""
    return [
        {"name": wf.name, "description": wf.description, "input_schema": wf.input_schema()} for wf in keel.workflows()
    ]


@router.get(
    "/tasks", response_model=TaskPage, responses=errors(), summary="List tasks", operation_id="listTasks", tags=TASKS
)
async def list_tasks(
    keel: App,
    key: Reader,
    status: Annotated[list[TaskStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    page = await keel.list_tasks(key.tenant, statuses=status or (), limit=limit, cursor=cursor)
    return render(TaskPage(items=[view(t) for t in page.tasks], next_cursor=page.next_cursor))


@router.get(
    "/tasks/{task_id}",
    response_model=TaskView,
    responses=ERRORS,
    summary="Poll a task",
    operation_id="getTask",
    tags=TASKS,
)
async def get_task(task_id: str, keel: App, key: Reader) -> Response:
    """Status, progress and timestamps; `Retry-After` while running; the envelope once terminal."""
    task = await keel.get(key.tenant, task_id)
    headers = {}
    if not task.status.terminal:
        # A task waiting for a person will not move by itself soon: poll slowly.
        wait = {TaskStatus.running: "1", TaskStatus.waiting_for_approval: "30"}
        headers["Retry-After"] = wait.get(task.status, "2")
    return render(view(task), headers=headers)


@router.post(
    "/tasks/{task_id}/cancel",
    response_model=TaskView,
    responses={**ERRORS, 202: {"model": TaskView, "description": "Cancellation requested; the task is winding down"}},
    summary="Cancel a task",
    operation_id="cancelTask",
    tags=TASKS,
)
async def cancel(task_id: str, keel: App, key: Writer) -> Response:
    """Idempotent. A running task stops at once and keeps its partial result."""
    task = await keel.cancel(key.tenant, task_id)
    return render(view(task), status_code=200 if task.status.terminal else 202)


@router.get(
    "/tasks/{task_id}/events",
    response_class=EventStream,
    responses={
        **ERRORS,
        200: event_stream(
            "Server-sent events from the task's durable log, up to and including `end`. `id:` is the event's "
            "sequence number: after a drop, reconnect with `Last-Event-ID` and nothing is lost or repeated.",
            'retry: 2000\n\nid: 1\nevent: status\ndata: {"status": "queued"}\n\n'
            'id: 2\nevent: status\ndata: {"status": "running", "attempt": 1}\n\n'
            'id: 5\nevent: progress\ndata: {"progress": 0.5, "step": "step-2"}\n\n'
            'id: 9\nevent: end\ndata: {"status": "succeeded", "envelope": {"status": "success", "result": {}, '
            '"errors": [], "metadata": {}}}\n\n',
        ),
        204: {"description": "The task is finished and nothing follows Last-Event-ID"},
        422: problem("`Last-Event-ID` is not an event sequence number"),
    },
    summary="Stream a task's events (SSE)",
    operation_id="streamTaskEvents",
    tags=TASKS,
)
async def events(
    task_id: str,
    keel: App,
    key: Reader,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id_q: Annotated[int | None, Query(alias="last_event_id", ge=0, le=MAX_EVENT_ID)] = None,
) -> Response:
    """`id:` is the event's sequence number; resume with `Last-Event-ID` (header or query), even after a restart."""
    after = last_event_id_q or 0
    if last_event_id:
        try:
            after = event_id(last_event_id)
        except InputError:
            await keel.get(key.tenant, task_id)  # another tenant's task is a 404 before the header is a 422
            raise
    if not await keel.has_events(key.tenant, task_id, after):
        return Response(status_code=204)
    return event_response(keel, task_id, after)


@router.get(
    "/models/stats",
    response_model=list[ModelStatsView],
    responses=errors(),
    summary="Rolling per-model counters",
    tags=["models"],
    operation_id="getModelStats",
)
async def model_stats(
    keel: App,
    key: Operator,
    model_id: Annotated[str | None, Query(description="One pinned model id; all models when omitted.")] = None,
    hours: Annotated[float, Query(gt=0, le=24 * 90, description="How far back, in hours.")] = 24,
) -> list[ModelStatsView]:
    """Per pinned model and hour: calls, errors, JSON- and schema-valid rates, refusals, truncations, latency,
    tokens and cost. The raw material for statistical SLAs on a model that may drift under a stable name. Counted
    over every tenant, so it needs the `operator` scope."""
    return [ModelStatsView.of(r) for r in await keel.model_stats(model_id, hours=hours)]


@router.get(
    "/slo",
    response_model=SloView,
    responses=errors(),
    summary="Statistical SLAs per pinned model",
    tags=["models"],
    operation_id="getSlo",
)
async def slo(keel: App, key: Operator) -> SloView:
    """Per (provider, model id), over the last `KEEL_SLO_WINDOW_H` hours: JSON validity, schema adherence, refusals,
    truncations, errors by class (429, 5xx, timeout, cut stream), repairs, fallbacks and cancellations, each with
    its Wilson 95% interval, its `n` and, where `KEEL_SLO` sets a threshold, a verdict (ok, uncertain, violated);
    and latency p50 and p95. A violated error or validity rate opens the model's circuit in fallback chains.
    Counted over every tenant, so it needs the `operator` scope."""
    return SloView.of(await keel.slo())
