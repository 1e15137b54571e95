"""The HTTP model adapters against loopback fakes that speak the real OpenAI and Anthropic wire formats.

Each scripted case (a completion, a stream, tool calls, a 429 with Retry-After, a 500, a stream cut mid-token, a
`length` finish, a refusal, drifted JSON) must come out as the right typed events or the right envelope error,
and accounting in the envelope must match the scripted usage exactly.
"""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from conftest import LiveServer
from keel.errors import ConfigError, ModelHTTPError, ModelOutputError, StreamCut
from keel.memory.types import NewTask, Task, TaskStatus
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.retry import RetryPolicy
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry, workflow
from keel.orchestration.llm.models import (
    FinishEvent,
    Message,
    Model,
    ModelResponse,
    ModelSettings,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    ToolSpec,
    UsageEvent,
    infer_model,
)
from keel.orchestration.llm.models.anthropic import AnthropicModel
from keel.orchestration.llm.models.catalog import is_pinned, lookup
from keel.orchestration.llm.models.openai import OpenAIModel
from keel.orchestration.llm.models.structured import check_output
from keel.providers import Registry
from keel.settings import Settings
from keel.testing.fake_llm import Cut, Fail, FakeAnthropicServer, FakeOpenAIServer, Hang, Reply, ToolCallSpec
from keel.testing.inmemory import InMemoryStore

OPENAI_ID = "gpt-4o-mini-2024-07-18"
ANTHROPIC_ID = "claude-3-5-haiku-20241022"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0.0)


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer() as srv:
        yield srv


@pytest.fixture
async def oai(openai_server: FakeOpenAIServer) -> AsyncIterator[OpenAIModel]:
    openai_server.reset()
    model = OpenAIModel(OPENAI_ID, base_url=openai_server.base_url, api_key="sk-test")
    yield model
    await model.aclose()


@pytest.fixture
async def claude(anthropic_server: FakeAnthropicServer) -> AsyncIterator[AnthropicModel]:
    anthropic_server.reset()
    model = AnthropicModel(ANTHROPIC_ID, base_url=anthropic_server.base_url, api_key="sk-test")
    yield model
    await model.aclose()


def server_of(model: Model, o: FakeOpenAIServer, a: FakeAnthropicServer) -> FakeOpenAIServer | FakeAnthropicServer:
    return o if isinstance(model, OpenAIModel) else a


@pytest.fixture(params=["openai", "anthropic"])
def both(
    request: pytest.FixtureRequest, oai: OpenAIModel, claude: AnthropicModel
) -> tuple[Model, FakeOpenAIServer | FakeAnthropicServer, str]:
    o: FakeOpenAIServer = request.getfixturevalue("openai_server")
    a: FakeAnthropicServer = request.getfixturevalue("anthropic_server")
    model: Model = oai if request.param == "openai" else claude
    model_id = OPENAI_ID if request.param == "openai" else ANTHROPIC_ID
    return model, server_of(model, o, a), model_id


USER = [Message(role="user", content="What are the risks?")]


async def collect(model: Any, **kw: Any) -> list[StreamEvent]:
    return [e async for e in model.stream(USER, **kw)]


# -- the seam, call by call -----------------------------------------------------------------------------------


async def test_completion_is_mapped_with_its_provenance(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Reply(text="Late deliveries.", model=model_id, input_tokens=12, output_tokens=3))
    resp = await model.request(USER, settings=ModelSettings(max_tokens=50, temperature=0.0))
    assert resp.text == "Late deliveries." and resp.finish_reason == "stop"
    assert (resp.input_tokens, resp.output_tokens, resp.model_id) == (12, 3, model_id)
    assert resp.provider in ("openai", "anthropic") and resp.adapter_version.startswith("keel-")
    assert resp.cost_usd == pytest.approx(lookup(model_id).cost(12, 3))
    body = srv.requests[-1]
    assert body["model"] == model_id and body["temperature"] == 0.0


async def test_stream_yields_typed_events_and_finish_last(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Reply(text="Currency exposure and late deliveries.", model=model_id, chunk_chars=5))
    events = await collect(model)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 3 and "".join(d.text for d in deltas) == "Currency exposure and late deliveries."
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "stop" and events[-1].model_id == model_id
    assert [e for e in events if isinstance(e, UsageEvent)] == [UsageEvent(input_tokens=10, output_tokens=5)]


async def test_tool_calls_streamed_and_not(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    call = ToolCallSpec(name="search", arguments={"query": "penalty clause"})
    tools = [ToolSpec(name="search", description="Search", parameters={"type": "object"})]
    srv.script(Reply(tool_calls=[call], finish_reason="tool_calls", model=model_id))
    resp = await model.request(USER, tools=tools)
    assert resp.finish_reason == "tool_calls"
    assert [(c.name, c.parsed()) for c in resp.tool_calls] == [("search", {"query": "penalty clause"})]
    srv.script(Reply(tool_calls=[call], finish_reason="tool_calls", model=model_id))
    events = await collect(model, tools=tools)
    parts = [e for e in events if isinstance(e, ToolCallDelta)]
    assert parts[0].name == "search" and '"penalty clause"' in "".join(p.arguments for p in parts)
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "tool_calls"


async def test_http_errors_are_mapped_with_retry_after(both: tuple[Model, Any, str]) -> None:
    model, srv, _ = both
    srv.script(Fail(status=429, retry_after=2.0, message="slow down"))
    with pytest.raises(ModelHTTPError) as err:
        await model.request(USER)
    assert err.value.status_code == 429 and err.value.retry_after == 2.0 and err.value.retryable
    assert "slow down" in err.value.message
    srv.script(Fail(status=500))
    with pytest.raises(ModelHTTPError) as err:
        await model.request(USER)
    assert err.value.status_code == 500 and err.value.retryable
    srv.script(Fail(status=400, message="bad field"))
    with pytest.raises(ModelHTTPError) as err:
        await model.request(USER)
    assert not err.value.retryable


async def test_a_cut_stream_is_never_passed_off_as_complete(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Cut(reply=Reply(text="The main risk is the supplier", model=model_id, chunk_chars=3), after_chunks=2))
    seen: list[StreamEvent] = []
    with pytest.raises(StreamCut) as err:
        async for event in model.stream(USER):
            seen.append(event)
    assert not any(isinstance(e, FinishEvent) for e in seen)
    assert err.value.partial_text == "".join(e.text for e in seen if isinstance(e, TextDelta))
    srv.script(Cut(reply=Reply(text="x" * 200, model=model_id)))
    with pytest.raises(StreamCut):  # non-streamed: a half body is a cut too
        await model.request(USER)


async def test_length_and_refusal_finish_reasons(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Reply(text="The risks are", finish_reason="length", model=model_id))
    assert (await model.request(USER)).finish_reason == "length"
    srv.script(Reply(refusal="I can't help with that.", model=model_id))
    resp = await model.request(USER)
    assert resp.finish_reason == "refusal" and resp.refusal and "can't help" in resp.refusal


async def test_structured_output_uses_the_native_mechanism(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    schema = Risks.model_json_schema()
    if isinstance(model, OpenAIModel):
        srv.script(Reply(text='{"risks": ["fx"]}', model=model_id))
    else:  # Anthropic: the forced tool's input is the answer
        srv.script(
            Reply(
                tool_calls=[ToolCallSpec(name="keel_output", arguments={"risks": ["fx"]})],
                model=model_id,
                finish_reason="tool_calls",
            )
        )
    resp = await model.request(USER, output_schema=schema)
    assert Risks.model_validate_json(resp.text).risks == ["fx"] and resp.finish_reason == "stop"
    body = srv.requests[-1]
    if isinstance(model, OpenAIModel):
        assert body["response_format"]["type"] == "json_schema" and body["response_format"]["json_schema"]["schema"]
    else:
        assert body["tool_choice"] == {"type": "tool", "name": "keel_output"}


# -- through ctx.generate: envelope errors, retries, accounting ------------------------------------------------


class Risks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    risks: list[str]


class Camel(BaseModel):
    topRisk: str  # noqa: N815 - the caller's schema really is camelCase


class Ask(BaseModel):
    structured: bool = False
    camel: bool = False


def ask_workflow(model: Model) -> Workflow[Ask]:
    @workflow(name="ask")
    async def ask(ctx: WorkflowContext, req: Ask) -> Any:
        output_type: type[BaseModel] | None = Camel if req.camel else Risks if req.structured else None
        out = await ctx.generate("answer", model, "What are the risks?", output_type=output_type, retry=FAST_RETRY)
        return out.model_dump() if isinstance(out, BaseModel) else out

    return ask


async def run(model: Model, inp: dict[str, Any] | None = None, tenant: str = "acme") -> tuple[Task, InMemoryStore]:
    store = InMemoryStore()
    registry = WorkflowRegistry()
    registry.register(ask_workflow(model))
    engine = EmbeddedEngine(store, registry, poll_s=0.01)
    created = await store.create_task(NewTask(tenant=tenant, workflow="ask", input=inp or {}), None, time.time())
    assert created.task
    await engine.start()
    try:
        for _ in range(1000):
            task = await store.get_task(created.task.id)
            assert task
            if task.status.terminal:
                return task, store
            await asyncio.sleep(0.01)
    finally:
        await engine.stop()
    raise AssertionError("task did not finish")


def errors(task: Task) -> list[tuple[str, str, str | None]]:
    assert task.envelope
    return [(e["type"], e["severity"], e["pointer"]) for e in task.envelope["errors"]]


async def test_accounting_matches_the_scripted_usage_exactly(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Reply(text="Two risks.", model=model_id, input_tokens=1234, output_tokens=567))
    task, store = await run(model)
    assert task.status is TaskStatus.succeeded and task.envelope
    meta = task.envelope["metadata"]
    want = (1234 * lookup(model_id).input_usd_per_mtok + 567 * lookup(model_id).output_usd_per_mtok) / 1e6
    assert meta["tokens"] == {"input": 1234, "output": 567, "total": 1801}
    assert meta["cost_usd"] == pytest.approx(want, abs=1e-12) and want > 0
    [call] = meta["model_calls"]
    assert call["model_id"] == model_id and call["requested_model"] == model_id and call["usage"] == "provider"
    assert (call["input_tokens"], call["output_tokens"]) == (1234, 567)
    assert call["cost_usd"] == pytest.approx(want, abs=1e-12)
    assert meta["steps"][0]["tokens"] == 1801 and meta["steps"][0]["cost_usd"] == pytest.approx(want, abs=1e-12)
    assert meta["tenant_usage"]["model_calls"] == 1 and meta["tenant_usage"]["cost_usd"] == pytest.approx(want)
    [stats] = await store.model_stats(model_id)
    assert (stats.calls, stats.input_tokens, stats.output_tokens) == (1, 1234, 567)
    assert meta["model_ids"] == [model_id] and errors(task) == []  # pinned: no floating-alias warning


async def test_tokens_stream_into_the_task_log(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Reply(text="Supplier concentration and currency risk.", model=model_id, chunk_chars=6))
    task, store = await run(model)
    tokens = [e.data["text"] for e in await store.read(task.id, 0, 1000) if e.type == "token"]
    assert len(tokens) > 3 and "".join(tokens) == "Supplier concentration and currency risk."


async def test_rate_limit_is_retried_after_retry_after(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Fail(status=429, retry_after=0.3), Reply(text="ok", model=model_id))
    started = time.monotonic()
    task, _ = await run(model)
    assert task.status is TaskStatus.succeeded and time.monotonic() - started >= 0.3
    assert task.envelope and task.envelope["metadata"]["steps"][0]["attempts"] == 2


async def test_server_errors_exhaust_retries_into_an_envelope_error(both: tuple[Model, Any, str]) -> None:
    model, srv, _ = both
    srv.script(Fail(status=500), Fail(status=502), Fail(status=503))
    task, store = await run(model)
    assert task.status is TaskStatus.failed and errors(task) == [("upstream_error", "error", None)]
    assert task.envelope and task.envelope["metadata"]["steps"][0]["attempts"] == 3
    [stats] = await store.model_stats()
    assert stats.calls == 3 and stats.errors == 3


async def test_cut_stream_is_retried_then_reported_as_truncation(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    cut = Cut(reply=Reply(text="The supplier may", model=model_id, chunk_chars=3), after_chunks=2)
    srv.script(cut, Reply(text="The supplier may fail.", model=model_id))
    task, store = await run(model)
    assert task.status is TaskStatus.succeeded and task.envelope
    assert task.envelope["result"] == "The supplier may fail."
    events = [e.type for e in await store.read(task.id, 0, 1000)]
    assert "step_retrying" in events  # readers drop the tokens of the cut try
    srv.script(cut, cut, cut)
    task, _ = await run(model)
    assert task.status is TaskStatus.failed and errors(task) == [("truncation", "error", None)]


async def test_length_finish_is_truncation(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Reply(text='{"risks": ["fx", "late', finish_reason="length", model=model_id))
    task, _ = await run(model, {"structured": True})
    assert task.status is TaskStatus.failed and errors(task) == [("truncation", "error", "")]
    srv.script(Reply(text="The risks are", finish_reason="length", model=model_id))
    task, _ = await run(model)  # plain text stays usable, but says it may be incomplete
    assert task.status is TaskStatus.succeeded and errors(task) == [("truncation", "warning", None)]


async def test_refusal_is_an_envelope_error(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Reply(refusal="I can't assist with that.", model=model_id))
    task, _ = await run(model, {"structured": True})
    assert task.status is TaskStatus.failed and errors(task) == [("refusal", "error", "")]


async def test_a_content_filter_finish_is_a_refusal_not_an_empty_success(
    oai: OpenAIModel, openai_server: FakeOpenAIServer
) -> None:
    srv = openai_server
    # The adapter keeps the provider's reason, streamed and not ...
    srv.script(Reply(text="", finish_reason="content_filter", model=OPENAI_ID))
    resp = await oai.request(USER)
    assert (resp.text, resp.finish_reason, resp.refusal) == ("", "content_filter", None)
    srv.script(Reply(text="Partial", finish_reason="content_filter", model=OPENAI_ID))
    events = await collect(oai)
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "content_filter"
    # ... and the answer check turns it into the refusal error, for plain text and structured output alike.
    for inp in ({}, {"structured": True}):
        srv.script(Reply(text="", finish_reason="content_filter", model=OPENAI_ID))
        task, store = await run(oai, inp)
        assert task.status is TaskStatus.failed and errors(task) == [("refusal", "error", "")], task.envelope
        assert task.envelope and "content filter stopped the answer" in task.envelope["errors"][0]["message"]
        assert task.envelope["result"] is None
        [stats] = await store.model_stats(OPENAI_ID)
        assert stats.refusals == 1


@pytest.fixture
def settings(settings: Settings, openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """conftest's settings, for a live server whose default model is the fake OpenAI-compatible provider."""
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
    openai_server.reset()
    settings.default_model = f"openai-compatible:{openai_server.base_url}#{OPENAI_ID}"
    return settings


def test_a_content_filter_finish_over_http_is_a_refusal_error(
    live: LiveServer, openai_server: FakeOpenAIServer
) -> None:
    openai_server.script(Reply(text="", finish_reason="content_filter", model=OPENAI_ID))
    with live.client() as c:
        r = c.post("/v1/chat", json={"message": "Write something the filter stops."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "failed" and body["envelope"]["status"] != "success", body
    [error] = body["envelope"]["errors"]
    assert error["type"] == "refusal" and error["severity"] == "error"
    assert "content filter stopped the answer" in error["message"]
    assert len(openai_server.requests) == 1


def test_check_output_refuses_a_content_filter_finish() -> None:
    cut = ModelResponse(text="The first half", finish_reason="content_filter")
    with pytest.raises(ModelOutputError, match="content filter stopped the answer after 14 characters") as err:
        check_output(cut, None)
    assert err.value.type == "refusal"
    assert check_output(ModelResponse(text="fine"), None) == "fine"


async def test_schema_violation_is_repaired_once_then_reported_with_a_pointer(
    oai: OpenAIModel, openai_server: FakeOpenAIServer
) -> None:
    srv = openai_server
    srv.script(Reply(text='{"risks": "fx"}', model=OPENAI_ID), Reply(text='{"risks": ["fx"]}', model=OPENAI_ID))
    task, _ = await run(oai, {"structured": True})
    assert task.status is TaskStatus.succeeded and task.envelope and task.envelope["result"] == {"risks": ["fx"]}
    assert [c["outcome"] for c in task.envelope["metadata"]["model_calls"]] == ["schema_violation", "ok"]
    assert "could not be used" in srv.requests[-1]["messages"][-1]["content"]
    srv.script(Reply(text='{"risks": "fx"}', model=OPENAI_ID), Reply(text='{"risks": 3}', model=OPENAI_ID))
    task, store = await run(oai, {"structured": True})
    assert task.status is TaskStatus.failed and errors(task) == [("schema_violation", "error", "/risks")]
    [stats] = await store.model_stats(OPENAI_ID)
    assert (stats.structured, stats.json_valid, stats.schema_valid) == (2, 2, 0)


async def test_schema_drift_is_named_as_such(oai: OpenAIModel, openai_server: FakeOpenAIServer) -> None:
    srv = openai_server
    drifted = Reply(text='{"top_risk": "fx"}', model=OPENAI_ID)
    srv.script(drifted, drifted)
    task, _ = await run(oai, {"camel": True})
    assert task.status is TaskStatus.failed and errors(task) == [("schema_drift", "error", "/top_risk")]
    assert task.envelope and "'top_risk' where the schema names 'topRisk'" in task.envelope["errors"][0]["message"]


async def test_floating_alias_is_warned_about(openai_server: FakeOpenAIServer) -> None:
    openai_server.reset()
    floating = OpenAIModel("gpt-4o", base_url=openai_server.base_url, api_key="sk-test")
    openai_server.script(Reply(text="ok", model="gpt-4o"))
    task, _ = await run(floating)
    assert task.status is TaskStatus.succeeded and errors(task) == [("floating_model_alias", "warning", None)]
    assert is_pinned("gpt-4o-2024-08-06") and is_pinned("claude-3-5-haiku-20241022") and not is_pinned("gpt-4o")
    await floating.aclose()


async def test_cancelling_a_stream_stops_it_promptly(both: tuple[Model, Any, str]) -> None:
    model, srv, model_id = both
    srv.script(Hang(seconds=30, reply=Reply(text="slow answer", model=model_id)))
    first = asyncio.Event()

    async def consume() -> None:
        async for event in model.stream(USER):  # type: ignore[attr-defined]
            if isinstance(event, TextDelta):
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0


# -- choosing an adapter from a string -------------------------------------------------------------------------


def test_infer_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        infer_model("openai:gpt-4o-mini")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    m = infer_model("openai:gpt-4o-mini-2024-07-18")
    assert isinstance(m, OpenAIModel) and m.context_window == 128_000
    c = infer_model("openai-compatible:http://127.0.0.1:8080/v1#qwen2.5", prices={"qwen2.5": {"input": 1, "output": 2}})
    assert isinstance(c, OpenAIModel) and c.base_url == "http://127.0.0.1:8080/v1" and c.info.input_usd_per_mtok == 1
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-y")
    assert isinstance(infer_model("anthropic:claude-3-5-haiku-20241022"), AnthropicModel)
    with pytest.raises(ConfigError, match="unknown model"):
        infer_model("gemini:pro")


async def test_fallback_chain_moves_on_after_a_provider_error(openai_server: FakeOpenAIServer) -> None:
    from keel.orchestration.llm.models.fallback import FallbackModel

    openai_server.reset()
    primary = OpenAIModel("gpt-4o-2024-08-06", base_url=openai_server.base_url, api_key="sk-test")
    backup = OpenAIModel(OPENAI_ID, base_url=openai_server.base_url, api_key="sk-test")
    chain = FallbackModel([primary, backup])
    openai_server.script(Fail(status=503), Reply(text="from the backup", model=OPENAI_ID))
    resp = await chain.request(USER)
    assert resp.text == "from the backup" and resp.model_id == OPENAI_ID
    assert [r["model"] for r in openai_server.requests] == ["gpt-4o-2024-08-06", OPENAI_ID]
    openai_server.script(Fail(status=400), Reply(text="unused", model=OPENAI_ID))
    with pytest.raises(ModelHTTPError):  # a bad request would be bad anywhere: no fallback on 4xx
        await chain.request(USER)
    assert openai_server.pending == 1
    await primary.aclose()
    await backup.aclose()


# -- providers: the test doubles register themselves -----------------------------------------------------------

SRC = Path(__file__).resolve().parents[3] / "src" / "keel"


def test_production_code_never_imports_keel_testing() -> None:
    """Not even lazily, nor as a dotted string it resolves: keel.testing declares its providers as entry points."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] == "testing":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                names = [node.value]
            offenders += [f"{path}:{node.lineno}" for n in names if n.startswith("keel.testing")]  # type: ignore[attr-defined]
    assert offenders == []


def test_the_test_doubles_are_found_in_a_fresh_process() -> None:
    """What a server started with KEEL_DEFAULT_MODEL=test and a hash: embedder does: nothing imported keel.testing
    before the spec is read."""
    code = (
        "import asyncio, sys\n"
        "from keel.orchestration.llm.models import Message, infer_model\n"
        "from keel.memory.embeddings import open_embedder\n"
        "assert not [m for m in sys.modules if m.startswith('keel.testing')]\n"
        "model = infer_model('test')\n"
        "print(asyncio.run(model.request([Message(role='user', content='echo me')])).text)\n"
        "print(open_embedder('hash:8').space.key)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["echo me", "hash@1"]


def test_a_registered_provider_is_built_and_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    from keel.orchestration.llm import models
    from keel.testing.models import FakeModel

    monkeypatch.setattr(models, "MODEL_PROVIDERS", Registry("keel.models", []))
    models.register_model_provider("openai", lambda spec, prices: None, form="openai:<model>")
    with pytest.raises(ConfigError, match=r"use openai:<model> or test"):  # `test` is keel.testing's entry point
        infer_model("gemini:pro")
    models.register_model_provider("mine", lambda spec, prices: FakeModel([spec.rest]), form="mine:<reply>")
    model = infer_model("mine:hello")
    assert isinstance(model, FakeModel) and model.script == ["hello"] and model.allow_floating
    with pytest.raises(ConfigError, match=r"use openai:<model>, test or mine:<reply>"):
        infer_model("openai:gpt-4o")  # its factory reads no spec: the same error as an unknown provider


# -- the local models' weights ---------------------------------------------------------------------------------


def test_split_weights_are_joined_only_when_their_sha256_is_the_pinned_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from keel.orchestration.llm.models import weights

    packages = tmp_path / "site"
    for i, data in enumerate((b"first half, ", b"second half"), start=1):
        (packages / f"fake_weights_part{i}" / "data").mkdir(parents=True)
        (packages / f"fake_weights_part{i}" / "__init__.py").write_text("")
        (packages / f"fake_weights_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setenv("KEEL_MODEL_CACHE", str(tmp_path / "cache"))
    pinned = hashlib.sha256(b"first half, second half").hexdigest()

    def spec(sha256: str) -> weights.Weights:
        return weights.Weights(
            alias="fake", name="fake-model", title="Fake", licence="none", file_name="fake.gguf", sha256=sha256,
            parts=weights._split("fake_weights_part", 2), pip="fake-weights",
        )  # fmt: skip

    with pytest.raises(ConfigError, match="the parts joined have SHA-256 .* not the pinned 0+; reinstall fake-weights"):
        weights._assemble(spec("0" * 64))
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix.startswith((".partial", ".gguf"))] == []
    joined = weights._assemble(spec(pinned))
    assert joined == tmp_path / "cache" / "fake.gguf" and joined.read_bytes() == b"first half, second half"
    assert weights._assemble(spec(pinned)) == joined  # found in the cache, not joined again
    whole = spec(pinned)
    whole = weights.Weights(**{**{f: getattr(whole, f) for f in whole.__dataclass_fields__}, "parts": whole.parts[:1]})
    with pytest.raises(ConfigError, match=r"part01\.bin has SHA-256 .* not the pinned"):
        weights._assemble(whole)
