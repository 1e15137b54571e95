"""OpenTelemetry spans with the in-memory exporter: one task gives one trace, from the submitting request through
the task run and its steps to the model and tool calls, each span under the right parent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from conftest import make_key, wait_terminal
from keel import observability
from keel.app import create_app, registry_for
from keel.netguard import AllowList
from keel.observability import Observer
from keel.observability.tracing import Tracing
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.workflow import Workflow
from keel.orchestration.tools.fetch import FetchArgs, FetchLimits, fetch
from keel.settings import Settings
from webhook_receiver import Receiver, new_secret


class TracedInput(BaseModel):
    question: str


async def traced(ctx: WorkflowContext, inp: TracedInput) -> dict[str, Any]:
    answer = await ctx.generate("answer", ctx.model(), inp.question)
    price = await ctx.tool("lookup", {"sku": "a1"})
    return {"answer": answer, "price": price}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def server(settings: Settings, exporter: InMemorySpanExporter) -> Iterator[tuple[str, str]]:
    settings.tools = ["endpoint_tools:TOOLS"]
    registry = registry_for(settings)
    registry.register(Workflow(name="traced", input_model=TracedInput, fn=traced))
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings, registry, observer=Observer(tracing=Tracing(provider)))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = make_key(settings.data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "keel test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}", key
    finally:
        uv.should_exit = True
        thread.join(timeout=15)


def test_one_task_gives_one_trace(server: tuple[str, str], exporter: InMemorySpanExporter, receiver: Receiver) -> None:
    url, key = server
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        response = client.post(
            "/v1/tasks",
            json={
                "workflow": "traced",
                "input": {"question": "what does a1 cost"},
                "webhook": {"url": receiver.url, "secret": new_secret()},
            },
            headers={"traceparent": caller},
        )
        assert response.status_code == 202, response.text
        task_id = response.json()["id"]
        assert wait_terminal(client, task_id)["status"] == "succeeded"

    spans = exporter.get_finished_spans()
    request = one(spans, "POST /v1/tasks")
    trace_id = request.context.trace_id
    assert f"{trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"  # the caller's trace goes on
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    task = one(in_trace, "task traced")
    assert parent_of(task) == request.context.span_id
    assert task.attributes is not None and task.attributes["keel.task.id"] == task_id
    answer, lookup = one(in_trace, "step answer"), one(in_trace, "step tool:lookup")
    assert parent_of(answer) == parent_of(lookup) == task.context.span_id
    model = next(s for s in in_trace if s.name.startswith("chat "))
    assert parent_of(model) == answer.context.span_id
    attributes = dict(model.attributes or {})
    for name in ("gen_ai.system", "gen_ai.request.model", "gen_ai.response.model"):
        assert attributes[name], name
    assert int(str(attributes["gen_ai.usage.input_tokens"])) > 0
    assert "gen_ai.usage.output_tokens" in attributes
    tool = one(in_trace, "execute_tool lookup")
    assert parent_of(tool) == lookup.context.span_id
    assert (tool.attributes or {})["gen_ai.tool.name"] == "lookup"
    # The webhook delivery carries the run's context: its receiver continues the same trace, from the task span.
    [hit] = receiver.wait_hits(1)
    assert hit.headers["traceparent"] == f"00-{trace_id:032x}-{task.context.span_id:016x}-01"
    # Polling is not part of the task's trace: each GET starts its own.
    polls = [s for s in spans if s.name == "GET /v1/tasks/{task_id}"]
    assert polls and all(s.context.trace_id != trace_id for s in polls)


def test_without_tracing_nothing_is_carried() -> None:
    observer = Observer()
    assert observer.carry({"a": 1}) == {"a": 1}
    assert observer.outgoing_headers() == {}
    assert observability.current().metrics is None  # no app here: the no-op observer


def test_the_submitters_context_travels_in_the_task(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    observer = Observer(tracing=tracing)
    with tracing.tracer.start_as_current_span("request") as span:
        carried = observer.carry({"a": 1})
        headers = observer.outgoing_headers()
    trace = f"{span.get_span_context().trace_id:032x}"
    assert carried["a"] == 1 and trace in carried["traceparent"]
    assert headers == {"traceparent": carried["traceparent"]}


def one(spans: Any, name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, sorted(s.name for s in spans))
    span: ReadableSpan = found[0]
    return span


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_otlp_export_only_when_its_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert observability.from_env().tracing is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    observer = observability.from_env()
    assert observer.tracing is not None
    processors = observer.tracing.provider._active_span_processor._span_processors  # noqa: SLF001
    assert [type(p).__name__ for p in processors] == ["BatchSpanProcessor"]
    observer.shutdown()  # nothing was recorded: nothing is sent


def test_without_an_endpoint_the_sdk_is_never_imported() -> None:
    code = (
        "import sys; from keel.app import create_app; from keel import observability; observability.from_env(); "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def page() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback page that records each GET's headers."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()


async def test_a_tool_fetch_carries_the_trace_downstream(
    page: tuple[str, list[dict[str, str]]], exporter: InMemorySpanExporter
) -> None:
    url, seen = page
    limits = FetchLimits(allow=AllowList.parse("127.0.0.1"))
    await fetch(FetchArgs(url=url), limits)  # no observer, no tracing: nothing is added
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    with observability.use(Observer(tracing=tracing)), tracing.tracer.start_as_current_span("execute_tool") as span:
        assert (await fetch(FetchArgs(url=url), limits)).text == "ok"
    context = span.get_span_context()
    assert "traceparent" not in seen[0]
    assert seen[1]["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
