"""OpenTelemetry spans for keel: a request, a task run, a step, a model call and a tool call, in one trace.

Imported only when the ``otel`` extra is installed and wanted (:func:`keel.observability.for_settings`), so
without it nothing of OpenTelemetry's SDK is loaded. Each app has its own ``TracerProvider`` (the global one is
left alone: an embedding host may own it). A task's run happens later, in a worker, so the submitting request's
context travels in the task's metadata as a W3C ``traceparent``, and the run's span is its child.
Model calls carry the GenAI semantic-convention attributes (``gen_ai.*``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from keel.memory.types import ModelCallRecord, Task
    from keel.observability import StepSeen, TaskSeen

_FAILED = frozenset({"failed"})


class Tracing:
    """Spans on one ``TracerProvider``; :meth:`traceparent` is the current context as a header value."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("keel")
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def otlp(cls) -> Tracing:
        """Export over OTLP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporters read the standard ``OTEL_*``
        variables themselves): HTTP/protobuf, or gRPC when ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``."""
        exporter: SpanExporter
        if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporter = GrpcExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporter = HttpExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "keel"}))  # OTEL_SERVICE_NAME wins
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent")

    def extract(self, headers: Mapping[str, str]) -> Context:
        return self._propagator.extract(dict(headers))

    @contextlib.contextmanager
    def request_span(self, method: str, path: str, headers: Mapping[str, str]) -> Iterator[Span]:
        """A server span per HTTP request, continuing the caller's trace when it sent a ``traceparent``."""
        attributes = {"http.request.method": method, "url.path": path}
        with self.tracer.start_as_current_span(
            method, context=self.extract(headers), kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            yield span

    def responded(self, span: Span, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))

    def routed(self, span: Span, method: str, template: str) -> None:
        """Name the request's span after its route template (low cardinality), once routing has found it."""
        span.set_attribute("http.route", template)
        span.update_name(f"{method} {template}")

    @contextlib.contextmanager
    def task_span(self, task: Task, seen: TaskSeen) -> Iterator[None]:
        carried = task.metadata.get("traceparent")
        parent = self.extract({"traceparent": carried}) if isinstance(carried, str) else None
        attributes = {"keel.task.id": task.id, "keel.workflow": task.workflow, "keel.tenant": task.tenant}
        with self.tracer.start_as_current_span(
            f"task {task.workflow}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield
            if seen.status is not None:
                span.set_attribute("keel.task.status", seen.status.value)
                if seen.status.value in _FAILED:
                    span.set_status(Status(StatusCode.ERROR, seen.status.value))

    @contextlib.contextmanager
    def step_span(self, key: str, kind: str, fn_id: str, seen: StepSeen) -> Iterator[None]:
        """A step's span; a tool call gets an ``execute_tool`` span inside it (GenAI conventions)."""
        with self.tracer.start_as_current_span(
            f"step {key}", attributes={"keel.step.key": key, "keel.step.kind": kind, "keel.step.fn": fn_id}
        ) as span:
            tool = fn_id.removeprefix("tool:")
            attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool}
            inner: contextlib.AbstractContextManager[Span] = (
                self.tracer.start_as_current_span(f"execute_tool {tool}", attributes=attributes)
                if kind == "tool"
                else contextlib.nullcontext(span)
            )
            with inner as tool_span:
                yield
                if seen.error is not None:
                    tool_span.set_status(Status(StatusCode.ERROR, str(seen.error.get("type", "failed"))))
            span.set_attribute("keel.step.tries", seen.tries)
            if seen.error is not None:
                span.set_status(Status(StatusCode.ERROR, str(seen.error.get("type", "failed"))))

    def model_span(self, call: ModelCallRecord) -> None:
        """The model call just recorded, as a client span ending now (it is recorded once it has returned)."""
        end = time.time_ns()
        attributes: dict[str, str | int | float] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": call.provider,
            "gen_ai.request.model": call.requested_model,
            "gen_ai.response.model": call.model_id,
            "gen_ai.usage.input_tokens": call.input_tokens,
            "gen_ai.usage.output_tokens": call.output_tokens,
            "keel.cost_usd": call.cost_usd,
        }
        if call.finish_reason:
            attributes["gen_ai.response.finish_reasons"] = call.finish_reason
        span = self.tracer.start_span(
            f"chat {call.requested_model}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=end - int(call.latency_ms * 1_000_000),
        )
        if call.error:
            span.set_status(Status(StatusCode.ERROR, call.outcome))
        span.end(end_time=end)

    def shutdown(self) -> None:
        self.provider.shutdown()
