"""keel's Prometheus metrics, on a registry of their own per app (never the process-global one), so that two apps
in one process (tests, an embedding host) keep apart. Every name starts with ``keel_``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from keel.memory.types import ModelCallRecord
    from keel.orchestration.llm.reliability import SloReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format."""

# Seconds: a step or a model call takes milliseconds to minutes; a task up to hours.
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The collectors, one attribute each; :meth:`render` is what ``/metrics`` answers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks_created = Counter("keel_tasks_created", "Tasks accepted, by workflow.", ["workflow"], registry=r)
        self.tasks_finished = Counter(
            "keel_tasks_finished", "Task runs that ended, by workflow and status.", ["workflow", "status"], registry=r
        )
        self.task_duration = Histogram(
            "keel_task_duration_seconds", "One run of a task, start to end.", ["workflow"], buckets=_TASK_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "keel_queue_depth", "Tasks waiting for a worker (read from the store at each scrape).", registry=r
        )
        self.step_duration = Histogram(
            "keel_step_duration_seconds", "Executed steps (not replayed), by kind and outcome.", ["kind", "status"],
            buckets=_STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_retries = Counter("keel_step_retries", "Step tries after the first, by kind.", ["kind"], registry=r)
        self.tool_calls = Counter("keel_tool_calls", "Tool calls, by tool and outcome.", ["tool", "status"], registry=r)
        self.model_calls = Counter(
            "keel_model_calls", "Model calls, by model id and outcome.", ["model", "outcome"], registry=r
        )
        self.model_errors = Counter(
            "keel_model_errors", "Model calls that failed outright, by model id.", ["model"], registry=r
        )
        self.model_latency = Histogram(
            "keel_model_call_latency_seconds", "Model call latency, by model id.", ["model"], buckets=_STEP_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.model_tokens = Counter(
            "keel_model_tokens", "Tokens, by model id and direction (input, output).", ["model", "direction"],
            registry=r,
        )  # fmt: skip
        self.model_cost = Counter("keel_model_cost_usd", "Model spend in USD, by model id.", ["model"], registry=r)
        self.webhook_deliveries = Counter(
            "keel_webhook_deliveries", "Webhook delivery attempts, by outcome.", ["outcome"], registry=r
        )
        self.webhook_failures = Counter(
            "keel_webhook_failures", "Webhook delivery attempts that did not deliver.", registry=r
        )
        self.open_streams = Gauge("keel_sse_open_streams", "SSE event streams open now.", registry=r)
        self.retention_deleted = Counter(
            "keel_retention_deleted", "Expired rows the sweeper deleted, by memory tier.", ["tier"], registry=r
        )
        self.slo_verdict = Gauge(
            "keel_slo_verdict",
            "Each rate with a KEEL_SLO threshold, per model: 0 ok, 1 uncertain, 2 violated (read at each scrape).",
            ["provider", "model_id", "metric"],
            registry=r,
        )
        self.budget_trips = Counter(
            "keel_budget_trips", "Runs stopped by a budget breaker, by budget.", ["budget"], registry=r
        )

    def slo(self, report: SloReport) -> None:
        """Replace the verdict gauges with ``report``'s: a model or a threshold gone from it leaves no stale gauge."""
        self.slo_verdict.clear()
        for m in report.models:
            for metric, r in m.metrics.items():
                if r.verdict is not None:
                    self.slo_verdict.labels(m.provider, m.model_id, metric).set(r.verdict.level)

    def model_call(self, call: ModelCallRecord) -> None:
        model = call.model_id or call.requested_model
        self.model_calls.labels(model, call.outcome).inc()
        if call.error:
            self.model_errors.labels(model).inc()
        self.model_latency.labels(model).observe(call.latency_ms / 1000)
        self.model_tokens.labels(model, "input").inc(call.input_tokens)
        self.model_tokens.labels(model, "output").inc(call.output_tokens)
        self.model_cost.labels(model).inc(call.cost_usd)

    def render(self) -> bytes:
        return generate_latest(self.registry)
