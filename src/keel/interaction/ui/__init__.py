"""The live trace page at ``/ui/``: a task list and a task's trace, updating live from its SSE stream.

Plain HTML, CSS and JavaScript in ``static/``, shipped in the package and served by keel itself: no build step and
no CDN, so the page works on an air-gapped host. The page is a client of the public API with the same API keys;
it keeps the key in ``sessionStorage`` and sends it only in the ``Authorization`` header (it streams events with
``fetch``, since a browser's ``EventSource`` cannot send headers). ``/ui/#key=…`` hands it a key for scripted use:
a fragment never reaches the server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from keel.interaction.auth import Reader
from keel.interaction.deps import App
from keel.memory.types import StepCheckpoint

__all__ = ["STATIC", "KeyView", "StepView", "add_ui"]

STATIC = Path(__file__).parent / "static"
"""The page's assets, package data (hatch ships every file under ``src/keel``)."""

HEADERS = {
    # Only keel's own assets and API: an injected script or a stray request to another host cannot run or leak.
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new keel version's page is never mixed with an old script
}


class KeyView(BaseModel):
    """The key the page holds, as the page needs it: whose tasks it sees, and which buttons to offer."""

    tenant: str
    scopes: list[str] = Field(description="Sorted; `admin` holds every scope.")


class StepView(BaseModel):
    """One recorded step on the timeline. The envelope lists steps without their times; the checkpoint has them."""

    name: str
    kind: str
    status: str
    started_at: float = Field(description="Unix time: when the step's last attempt began.")
    finished_at: float
    duration_ms: float
    tries: int = Field(description="Attempts of the step itself (retries + 1).")
    run_attempt: int = Field(description="The task's run that recorded it; a later run replays it.")
    error: dict[str, object] | None

    @classmethod
    def of(cls, cp: StepCheckpoint) -> StepView:
        return cls(
            name=cp.key,
            kind=cp.kind,
            status=cp.status.value,
            started_at=round(cp.finished_at - cp.duration_ms / 1000, 6),
            finished_at=cp.finished_at,
            duration_ms=cp.duration_ms,
            tries=cp.tries,
            run_attempt=cp.run_attempt,
            error=cp.error,
        )


class _Assets(StaticFiles):
    """The static files, with the page's security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def add_ui(app: FastAPI, *, path: str = "/ui") -> None:
    """Serve the page at ``{path}/``, with two read-only routes of its own under ``{path}/api/`` (kept out of the
    OpenAPI document, as the page's private needs): who the caller's key is (the public API has no "who am I",
    and the page must know whether to offer Approve and Deny), and a task's recorded steps with their times."""

    @app.get(f"{path}/api/key", include_in_schema=False, response_model=KeyView)
    async def current_key(key: Reader) -> KeyView:
        return KeyView(tenant=key.tenant, scopes=sorted(key.scopes))

    @app.get(f"{path}/api/tasks/{{task_id}}/steps", include_in_schema=False, response_model=list[StepView])
    async def task_steps(task_id: str, keel: App, key: Reader) -> list[StepView]:
        return [StepView.of(cp) for cp in await keel.steps(key.tenant, task_id)]

    # After the route above: the mount answers everything else under the prefix.
    app.mount(path, _Assets(directory=STATIC, html=True), name="ui")
