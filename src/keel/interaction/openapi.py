"""The OpenAPI document, made to match the wire, and the pages that show it without a network.

FastAPI writes the document from the routes; :class:`KeelAPI` finishes it in one place (:func:`finish`), so every
router (and a router added later) gets the same rules:

- every non-2xx answer is ``application/problem+json`` with the :class:`~keel.interaction.problems.Problem` schema,
  FastAPI's ``HTTPValidationError`` included (keel never sends that shape);
- an operation behind the bearer scheme (:data:`keel.interaction.auth.BEARER`) lists 401 and 403;
- an operation without an explicit ``operation_id`` gets its function's name in camelCase (:func:`operation_id`).

The task event stream's frames are documented by :func:`event_stream` (each event's name and data shape), the
webhook by :func:`add_webhooks` (OpenAPI 3.1 ``webhooks``), and ``/docs`` and ``/redoc`` load Swagger UI and ReDoc
from files keel serves itself (:func:`add_docs`). :func:`render` is the text committed as ``docs/openapi.json``;
``scripts/openapi.py`` writes it and ``--check`` compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import fastapi_offline
from fastapi import FastAPI, Header, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from keel.interaction.problems import PROBLEM_JSON, Problem
from keel.interaction.schemas import DecisionView, Envelope
from keel.memory.types import TaskStatus

REF = "#/components/schemas/{model}"
PROBLEM_REF = {"$ref": REF.format(model="Problem")}
_FASTAPI_422 = {"$ref": REF.format(model="HTTPValidationError")}
_AUTH = {
    "401": "Missing or invalid API key (`WWW-Authenticate: Bearer`)",
    "403": "The API key lacks the scope this operation needs",
}


def operation_id(route: APIRoute) -> str:
    """``list_tasks`` → ``listTasks``: a generated client's method name, for a route that names none itself."""
    head, *rest = route.name.split("_")
    return head + "".join(word.capitalize() for word in rest)


# -- the task event stream ----------------------------------------------------------------------------------------


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow")  # a workflow may add members; a client should keep what it ignores


class StatusEvent(_Data):
    """The task changed status."""

    status: TaskStatus
    attempt: int | None = Field(None, description="With `running`: which attempt this is.")
    pending_decisions: int | None = Field(None, description="With `waiting_for_approval`: how many are open.")


class ProgressEvent(_Data):
    """How far the task is, as the workflow estimates it."""

    progress: float = Field(ge=0, le=1)
    step: str | None = Field(None, description="What it is doing now.")


class StageEvent(_Data):
    """A workflow's own milestone, e.g. `document_analysis`'s `plan`, `ingest`, `extract`, `compare`."""

    stage: str
    done: int | None = None
    total: int | None = None


class TokenEvent(_Data):
    """Text the model wrote, as it wrote it. Not kept in the durable log: a resumed stream skips old tokens, and
    `end` carries the whole answer."""

    text: str
    step: str | None = Field(None, description="The step whose model call wrote it.")


class StepEvent(_Data):
    """A durable step started (`step_started`), completed, failed for good, was retried or cancelled."""

    step: str = Field(description="The step's key: its path in the workflow.")
    kind: str | None = Field(None, description="`model`, `tool`, `activity`, …")
    attempt: int | None = None
    tries: int | None = None
    duration_ms: float | None = None
    error: dict[str, Any] | None = Field(None, description="With `step_failed`: `{type, message, pointer?}`.")


class PlanEvent(_Data):
    """The validated plan, before anything expensive runs."""

    plan: dict[str, Any]
    attempts: int


class EndEvent(_Data):
    """The last event: the terminal status and the envelope. Nothing follows it."""

    status: TaskStatus
    envelope: Envelope


class OtherEvent(_Data):
    """Any other event a workflow or tool emits (`budget`, `effect_applied`, `model_repair`, `retrieval`, …)."""


EVENTS: dict[str, type[BaseModel]] = {
    "status": StatusEvent,
    "progress": ProgressEvent,
    "stage": StageEvent,
    "token": TokenEvent,
    "step_started": StepEvent,
    "step_completed": StepEvent,
    "step_failed": StepEvent,
    "step_retrying": StepEvent,
    "plan": PlanEvent,
    "decision_requested": DecisionView,
    "decision_made": DecisionView,
    "end": EndEvent,
}
"""The events of a task's stream by name (``event:``), and the shape of their ``data:``."""


def _frame(name: str | None, data: type[BaseModel]) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "string", "description": "Any other event name."}
    if name is not None:
        event = {"const": name}
    return {
        "type": "object",
        "title": f"{name or 'other'} event",
        "description": data.__doc__ or "",
        "required": ["id", "event", "data"],
        "properties": {
            "id": {"type": "string", "description": "The event's sequence number: send it as `Last-Event-ID`."},
            "event": event,
            "data": {"$ref": REF.format(model=data.__name__), "description": "One line of JSON."},
        },
    }


def event_stream(description: str, example: str) -> dict[str, Any]:
    """A ``text/event-stream`` answer of a task's events. The body is a stream (a string, to a generated client);
    each message's shape, ``id:`` / ``event:`` / ``data:`` per event name, is ``x-itemSchema``: OpenAPI 3.2's
    ``itemSchema`` for sequential media types, as the extension 3.1 allows. The description lists the events
    (Swagger UI shows it), and each ``data:`` shape is a named schema under ``components``."""
    frames = [_frame(name, model) for name, model in EVENTS.items()] + [_frame(None, OtherEvent)]
    listing = "\n".join(f"- `{name}`: `{model.__name__}`" for name, model in EVENTS.items())
    schema = {
        "type": "string",
        "contentMediaType": "text/event-stream",
        "description": "SSE messages, one per event of the task's durable log, up to and including `end`; "
        "first a `retry:` hint, and `:` heartbeat comments between events. `event:` names, with the schema "
        f"of their `data:` (one line of JSON):\n\n{listing}\n- any other name: `OtherEvent`",
    }
    media = {"schema": schema, "example": example, "x-itemSchema": {"oneOf": frames}}
    return {"description": description, "content": {"text/event-stream": media}}


class EventStream(Response):
    """A route's ``response_class`` when it answers ``text/event-stream``, so the document says so."""

    media_type = "text/event-stream"


# -- webhooks -----------------------------------------------------------------------------------------------------


class TaskWebhookData(BaseModel):
    task_id: str
    status: TaskStatus
    envelope: Envelope = Field(description="Final; with `waiting_for_approval` a provisional one.")


class TaskWebhook(BaseModel):
    """A task's webhook (the Standard Webhooks payload: `type`, `timestamp`, `data`)."""

    type: Literal[
        "task.succeeded",
        "task.partial_success",
        "task.failed",
        "task.cancelled",
        "task.needs_clarification",
        "task.waiting_for_approval",
    ] = Field(description="`task.<status>`: when the task ends, and when it parks to wait for a person.")
    timestamp: float = Field(description="Unix time the event was queued.")
    data: TaskWebhookData


WebhookId = Annotated[str, Header(alias="webhook-id", description="Stable across retries: deduplicate on it.")]
WebhookTimestamp = Annotated[
    str, Header(alias="webhook-timestamp", description="Unix seconds of this attempt; reject stale ones.")
]
WebhookSignature = Annotated[
    str,
    Header(
        alias="webhook-signature",
        description="`v1,` + base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` with the secret's "
        "key (Standard Webhooks; the `standardwebhooks` library verifies it).",
    ),
]


def add_webhooks(app: FastAPI) -> None:
    """Document what keel POSTs to a task's ``webhook.url`` (OpenAPI 3.1 ``webhooks``; nothing is served)."""

    @app.webhooks.post(
        "task",
        operation_id="taskWebhook",
        summary="A task ended, or waits for approval",
        status_code=204,
        responses={
            200: {"description": "Any 2xx acknowledges the delivery."},
            410: {"description": "Gone: keel stops sending to this URL (for this tenant)."},
        },
    )
    def task_webhook(
        body: TaskWebhook,
        webhook_id: WebhookId,
        webhook_timestamp: WebhookTimestamp,
        webhook_signature: WebhookSignature,
    ) -> None:
        """Sent from a durable outbox, signed per Standard Webhooks. Another status, a timeout or a network
        error is retried with backoff (`Retry-After` is honoured) up to `KEEL_WEBHOOK_MAX_ATTEMPTS`; redirects
        are not followed."""


# -- the document -------------------------------------------------------------------------------------------------


def _components() -> dict[str, Any]:
    """The schemas the rules refer to: :class:`Problem` and the event data shapes."""
    models: list[type[BaseModel]] = list(dict.fromkeys([Problem, *EVENTS.values(), OtherEvent]))
    _, top = models_json_schema([(m, "serialization") for m in models], ref_template=REF)
    defs: dict[str, Any] = top["$defs"]
    return defs


def _replace_problem(response: dict[str, Any]) -> None:
    """Declare ``response`` as a problem, keeping its examples. A response that names a schema of its own (not
    FastAPI's validation error) is left alone: a body that is not a problem."""
    media = response.get("content", {})
    if any(m.get("schema") not in (None, {}, _FASTAPI_422) for m in media.values()):
        return
    kept = {k: v for m in media.values() for k, v in m.items() if k in ("example", "examples")}
    response["content"] = {PROBLEM_JSON: {"schema": PROBLEM_REF, **kept}}


def finish(spec: dict[str, Any]) -> dict[str, Any]:
    """The rules of the module docstring, applied to FastAPI's document."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for fastapi_only in ("HTTPValidationError", "ValidationError"):
        schemas.pop(fastapi_only, None)
    for name, schema in _components().items():
        schemas.setdefault(name, schema)  # a schema a route already declared (Envelope) stays as FastAPI wrote it
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            if operation.get("security"):
                for status, description in _AUTH.items():
                    responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status[0] in "45" or status == "default":
                    _replace_problem(response)
    for item in spec.get("webhooks", {}).values():
        for operation in item.values():
            # What a receiver answers is its own affair (keel reads only 2xx and 410): no FastAPI 422 there.
            responses = operation.get("responses", {})
            if responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema") == _FASTAPI_422:
                del responses["422"]
    return spec


class KeelAPI(FastAPI):
    """FastAPI, with the document :func:`finish` made (built once, on first use, as FastAPI does)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = finish(super().openapi())
        return self.openapi_schema


def render(app: FastAPI) -> str:
    """The document as committed to ``docs/openapi.json``: indented, keys sorted (diffs stay small)."""
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# -- /docs and /redoc, offline ------------------------------------------------------------------------------------

ASSETS = Path(fastapi_offline.__file__).parent / "static"
"""Swagger UI 5 (it reads OpenAPI 3.1) and ReDoc, as the ``fastapi-offline`` package ships them."""


def add_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Swagger UI at ``docs_url`` and ReDoc at ``redoc_url``, every asset served by keel (no CDN: the pages work
    on an air-gapped host). Build the app with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are off."""
    assets = f"{docs_url}/assets"
    app.mount(assets, StaticFiles(directory=ASSETS), name="docs-assets")
    oauth2_redirect = f"{docs_url}/oauth2-redirect"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_js_url=f"{root}{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets}/swagger-ui.css",
            swagger_favicon_url=f"{root}{assets}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayOperationId": True},
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{assets}/favicon.png",
            with_google_fonts=False,
        )
