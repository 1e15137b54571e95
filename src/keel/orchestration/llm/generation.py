"""The model step behind ``ctx.generate``: stream tokens into the task's log, validate the answer, repair it a
bounded number of times, charge tokens and cost, and leave a record of every call (provider, models, adapter,
settings, usage, latency, outcome) for the envelope and the per-model counters."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel

from keel.errors import ModelHTTPError, ModelOutputError, StreamCut, UpstreamError
from keel.memory.types import ModelCallRecord
from keel.orchestration.llm.models.base import (
    Message,
    Model,
    ModelResponse,
    ModelSettings,
    StreamEvent,
    StreamingModel,
    TextDelta,
    ToolSpec,
    stream_response,
    supports_streaming,
)
from keel.orchestration.llm.models.catalog import ModelInfo, is_pinned
from keel.orchestration.llm.models.structured import REPAIRABLE, check_output, repair_prompt, strip_fences

if TYPE_CHECKING:
    from keel.orchestration.engine.context import WorkflowContext


async def ask(
    ctx: WorkflowContext,
    key: str,
    model: Model,
    messages: list[Message],
    *,
    output_type: type[BaseModel] | None,
    schema: dict[str, Any] | None,
    settings: ModelSettings | None,
    repairs: int,
    stream: bool,
    tools: Sequence[ToolSpec] = (),
) -> dict[str, Any]:
    """One durable model step's body. Returns what the checkpoint keeps; raises ModelOutputError when the
    answer stays unusable after ``repairs`` re-asks."""
    conversation = list(messages)
    calls: list[dict[str, Any]] = []
    for attempt in range(repairs + 1):
        resp = await _call(ctx, key, model, conversation, schema, settings, stream, tools)
        try:
            value = check_output(resp, output_type)
        except ModelOutputError as exc:
            calls.append(_record(ctx, model, resp, settings, outcome=exc.type, structured=output_type is not None))
            if exc.type in REPAIRABLE and attempt < repairs and schema is not None:
                conversation += [
                    Message(role="assistant", content=resp.text),
                    Message(role="user", content=repair_prompt(exc, schema)),
                ]
                await ctx.emit("model_repair", {"step": key, "attempt": attempt + 1, "error": exc.message})
                continue
            exc.step = key
            exc.detail["calls"] = calls
            raise
        calls.append(_record(ctx, model, resp, settings, outcome="ok", structured=output_type is not None))
        return {
            "step": key,
            "output": pydantic_core.to_jsonable_python(value),
            "finish_reason": resp.finish_reason,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in resp.tool_calls],
            "calls": calls,
        }
    raise AssertionError("unreachable: the loop returns or raises")


async def _call(
    ctx: WorkflowContext,
    key: str,
    model: Model,
    messages: list[Message],
    schema: dict[str, Any] | None,
    settings: ModelSettings | None,
    stream: bool,
    tools: Sequence[ToolSpec] = (),
) -> ModelResponse:
    started = time.time()

    async def on_event(event: StreamEvent) -> None:
        if isinstance(event, TextDelta) and event.text:
            # Held and committed in batches, not one fsync per token.
            await ctx.emit_nowait("token", {"step": key, "text": event.text})

    try:
        if stream and supports_streaming(model):
            streaming: StreamingModel = model  # type: ignore[assignment]
            resp = await stream_response(
                streaming, messages, on_event=on_event, tools=tools, output_schema=schema, settings=settings
            )
        else:
            resp = await model.request(messages, tools=tools, output_schema=schema, settings=settings)
    except (UpstreamError, TimeoutError) as exc:
        ctx.record_model_call(_failed_call(model, exc, started))
        raise
    if not resp.input_tokens:
        resp.input_tokens = sum(model.count_tokens(m.content) for m in messages)
        resp.usage_counted = True
    if not resp.output_tokens and resp.text:
        resp.output_tokens = model.count_tokens(resp.text)
        resp.usage_counted = True
    ctx.charge_usage(
        {
            "model_calls": 1,
            "input_tokens": resp.input_tokens,
            "output_tokens": resp.output_tokens,
            "cost_usd": resp.cost_usd,
        }
    )
    return resp


def _is_json(text: str) -> bool:
    try:
        json.loads(strip_fences(text))
    except json.JSONDecodeError:
        return False
    return True


def _record(
    ctx: WorkflowContext,
    model: Model,
    resp: ModelResponse,
    settings: ModelSettings | None,
    *,
    outcome: str,
    structured: bool,
) -> dict[str, Any]:
    # Validity rates are about answers that came back as text to validate: not refusals, not cut-offs.
    structured = structured and outcome in ("ok", *REPAIRABLE)
    rec = ModelCallRecord(
        provider=resp.provider or getattr(model, "provider", ""),
        requested_model=resp.requested_model or getattr(model, "model", model.name),
        model_id=resp.model_id or model.name,
        adapter_version=resp.adapter_version,
        at=time.time(),
        latency_ms=resp.latency_ms,
        input_tokens=resp.input_tokens,
        output_tokens=resp.output_tokens,
        cost_usd=resp.cost_usd,
        finish_reason=resp.finish_reason,
        json_valid=_is_json(resp.text) if structured else None,
        schema_valid=(outcome == "ok") if structured else None,
        refusal=outcome == "refusal",
        truncated=resp.finish_reason == "length",
        outcome=outcome,
        settings=(settings or ModelSettings()).as_record(),
        usage_counted=resp.usage_counted,
    )
    ctx.record_model_call(rec)
    return rec.as_metadata()


def _failed_call(model: Model, exc: BaseException, started: float) -> ModelCallRecord:
    if isinstance(exc, StreamCut):
        outcome = "truncation"
    elif isinstance(exc, ModelHTTPError):
        outcome = f"http_{exc.status_code}"
    else:
        outcome = type(exc).__name__
    return ModelCallRecord(
        provider=getattr(model, "provider", ""),
        requested_model=getattr(model, "model", model.name),
        model_id=getattr(model, "model_id", "") or getattr(model, "model", model.name),
        at=time.time(),
        latency_ms=round((time.time() - started) * 1000, 3),
        outcome=outcome,
        truncated=isinstance(exc, StreamCut),
        error=True,
    )


def absorb(ctx: WorkflowContext, model: Model, out: dict[str, Any]) -> None:
    """Fold a model step's outcome (fresh or replayed) into the envelope: calls, model ids, and warnings for
    floating aliases and truncated text."""
    step = out.get("step")
    for call in out.get("calls", []):
        ctx.metadata["model_calls"].append(call)
        model_id = call.get("model_id") or model.name
        if model_id not in ctx.metadata["model_ids"]:
            ctx.metadata["model_ids"].append(model_id)
            if not is_pinned(model_id) and not getattr(model, "allow_floating", False):
                ctx.warn(
                    "floating_model_alias",
                    f"model {model_id!r} is a floating alias: the provider may change what answers under it. "
                    "Pin a dated checkpoint, or allow floating aliases in the settings.",
                    step=step,
                )
            if not _price_known(model, call):
                ctx.warn(
                    "price_unknown",
                    f"no price is known for model {model_id!r}: its calls were counted at $0, so the cost and any "
                    "cost budget leave them out. Set its price in KEEL_MODEL_PRICES.",
                    step=step,
                )
    if out.get("finish_reason") == "length" and isinstance(out.get("output"), str):
        ctx.warn("truncation", "the answer stopped at the token limit; it may be incomplete", step=step)


def _price_known(model: Model, call: dict[str, Any]) -> bool:
    """Whether the model that made ``call`` (``model`` itself, or the member of its fallback chain that answered)
    has a known price. A model without catalog ``info`` (local, test doubles) is one the catalog calls free."""
    members: list[Model] = getattr(model, "models", None) or [model]
    for member in members:
        if getattr(member, "provider", None) == call.get("provider") and getattr(member, "model", None) == call.get(
            "requested_model"
        ):
            info: ModelInfo | None = getattr(member, "info", None)
            return info is None or info.known
    return True


def messages_of(prompt: str | Sequence[Message]) -> list[Message]:
    return [Message(role="user", content=prompt)] if isinstance(prompt, str) else list(prompt)
