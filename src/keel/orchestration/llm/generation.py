"""The model step behind ``ctx.generate``: stream tokens into the task's log, validate the answer, repair it a
bounded number of times, charge tokens and cost, and leave a record of every call (provider, models, adapter,
settings, usage, latency, outcome) for the envelope and the per-model counters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
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
from keel.orchestration.llm.models.fallback import ChainLog, model_key, watch_chain
from keel.orchestration.llm.models.structured import REPAIRABLE, adheres, check_output, repair_prompt, strip_fences

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
    repairing: bool = False,
) -> dict[str, Any]:
    """One durable model step's body. Returns what the checkpoint keeps; raises ModelOutputError when the
    answer stays unusable after ``repairs`` re-asks. ``repairing``: the step itself is a caller's re-ask."""
    conversation = list(messages)
    calls: list[dict[str, Any]] = []
    for attempt in range(repairs + 1):
        repair = repairing or attempt > 0
        resp = await _call(ctx, key, model, conversation, schema, settings, stream, tools, repair=repair)
        answer = Answer(output_type=output_type, schema=schema, settings=settings, repair=repair)
        try:
            value = check_output(resp, output_type)
        except ModelOutputError as exc:
            calls.append(_record(ctx, model, resp, answer, outcome=exc.type))
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
        calls.append(_record(ctx, model, resp, answer, outcome="ok"))
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
    *,
    repair: bool = False,
) -> ModelResponse:
    started = time.time()

    async def on_event(event: StreamEvent) -> None:
        if isinstance(event, TextDelta) and event.text:
            # Held and committed in batches, not one fsync per token.
            await ctx.emit_nowait("token", {"step": key, "text": event.text})

    with watch_chain() as chain:
        try:
            if stream and supports_streaming(model):
                streaming: StreamingModel = model  # type: ignore[assignment]
                resp = await stream_response(
                    streaming, messages, on_event=on_event, tools=tools, output_schema=schema, settings=settings
                )
            else:
                resp = await model.request(messages, tools=tools, output_schema=schema, settings=settings)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            # A chain has logged each of its models that failed; a lone model's failure is recorded here.
            if not await _account_chain(ctx, key, chain, repair=repair, emit=not cancelled) and (
                cancelled or isinstance(exc, UpstreamError | TimeoutError | httpx.TransportError)
            ):
                ctx.record_model_call(_failed_call(model, exc, started, repair=repair))
            raise
    resp.fallback = await _account_chain(ctx, key, chain, repair=repair)
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


@dataclass(kw_only=True, slots=True, frozen=True)
class Answer:
    """What a call's answer is checked against: an output type, or only a JSON schema (``/v1/reason``), or neither."""

    output_type: type[BaseModel] | None
    schema: dict[str, Any] | None
    settings: ModelSettings | None
    repair: bool

    def validity(self, resp: ModelResponse, outcome: str) -> tuple[bool | None, bool | None]:
        """(JSON valid, schema valid) for a structured answer; (None, None) when there is nothing to validate:
        plain text, a tool call, a refusal or a cut-off (validity rates are about answers that came back whole)."""
        whole = outcome in ("ok", *REPAIRABLE) and resp.finish_reason not in ("length", "tool_calls", "refusal")
        if self.schema is None or not whole or resp.tool_calls:
            return None, None
        if self.output_type is not None:  # check_output validated it: its outcome says
            return _is_json(resp.text), outcome == "ok"
        try:
            value = json.loads(strip_fences(resp.text))
        except json.JSONDecodeError:
            return False, False
        return True, adheres(value, self.schema)


def _record(
    ctx: WorkflowContext,
    model: Model,
    resp: ModelResponse,
    answer: Answer,
    *,
    outcome: str,
) -> dict[str, Any]:
    json_valid, schema_valid = answer.validity(resp, outcome)
    settings = answer.settings
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
        json_valid=json_valid,
        schema_valid=schema_valid,
        refusal=outcome == "refusal",
        truncated=resp.finish_reason == "length",
        outcome=outcome,
        settings=(settings or ModelSettings()).as_record(),
        usage_counted=resp.usage_counted,
        repair=answer.repair,
        fallback=resp.fallback,
    )
    ctx.record_model_call(rec)
    return rec.as_metadata()


def error_class(exc: BaseException) -> str:
    """How a failed call is classed in the error rates (:data:`~keel.memory.types.ERROR_CLASSES`)."""
    if isinstance(exc, StreamCut):
        return "cut"
    if isinstance(exc, UpstreamError) and exc.status_code == 429:
        return "429"
    if isinstance(exc, UpstreamError) and exc.status_code is not None and exc.status_code >= 500:
        return "5xx"
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    return "other"


def _failed_call(
    model: Model, exc: BaseException, started: float, *, repair: bool = False, fallback: bool = False
) -> ModelCallRecord:
    cancelled = isinstance(exc, asyncio.CancelledError)
    if cancelled:
        outcome = "cancelled"
    elif isinstance(exc, StreamCut):
        outcome = "truncation"
    elif isinstance(exc, ModelHTTPError):
        outcome = f"http_{exc.status_code}"
    else:
        outcome = type(exc).__name__
    provider, requested = model_key(model)
    return ModelCallRecord(
        provider=provider,
        requested_model=requested,
        model_id=getattr(model, "model_id", "") or requested,
        at=time.time(),
        latency_ms=round((time.time() - started) * 1000, 3),
        outcome=outcome,
        truncated=isinstance(exc, StreamCut),
        error=True,
        error_class="" if cancelled else error_class(exc),
        cancelled=cancelled,
        repair=repair,
        fallback=fallback,
    )


async def _account_chain(ctx: WorkflowContext, key: str, chain: ChainLog, *, repair: bool, emit: bool = True) -> bool:
    """What a fallback chain did besides answering: each model that failed is recorded as its own call, each one
    skipped is listed in the envelope with why, and each circuit change goes on the task's stream (not while the
    step is being cancelled). Whether any model of the chain did not answer."""
    attempts, changes = chain.attempts, chain.changes
    for i, attempt in enumerate(attempts):
        provider, requested = model_key(attempt.model)
        if attempt.error is not None:
            started = time.time() - attempt.latency_ms / 1000
            ctx.record_model_call(_failed_call(attempt.model, attempt.error, started, repair=repair, fallback=i > 0))
        else:
            ctx.note_model_call(
                {"provider": provider, "requested_model": requested, "model_id": requested, "outcome": "skipped",
                 "reason": attempt.skipped, "circuit": attempt.circuit, "verdicts": attempt.verdicts}
            )  # fmt: skip
    for change in changes if emit else ():
        await ctx.emit("model_circuit", {"step": key, **change.as_event()})
    return bool(attempts)


def absorb(ctx: WorkflowContext, model: Model, out: dict[str, Any], *, replayed: bool = True) -> None:
    """Fold a model step's outcome into the envelope: model ids, warnings for floating aliases and truncated text,
    and, for a replayed step, its calls (a step run now put them there as they happened)."""
    step = out.get("step")
    for call in out.get("calls", []):
        if replayed:
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
