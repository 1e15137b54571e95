"""Every model call counted, over a live server with scripted providers on loopback: /v1/reason's answers count as
structured output; a refused, a cancelled and a failed fallback call are in ``metadata.model_calls`` and the
stats; a fallback chain's failing primary is counted under its own provider, its circuit opens on its verdict
(``GET /v1/slo``, the operator's), and the chain then answers without asking it. The bugs of issue 19, one test each."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import LiveServer, make_key, wait_terminal
from keel.settings import Settings
from keel.testing.fake_llm import Fail, FakeAnthropicServer, FakeOpenAIServer, Hang, Reply

OPENAI_ID = "gpt-4o-mini-2024-07-18"
ANTHROPIC_ID = "claude-3-5-haiku-20241022"
SCHEMA = {"type": "object", "properties": {"urgency": {"type": "integer"}}, "required": ["urgency"]}


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def claude(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAnthropicServer]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    with FakeAnthropicServer() as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        yield server


@pytest.fixture
def settings(settings: Settings, llm: FakeOpenAIServer, claude: FakeAnthropicServer) -> Settings:
    settings.default_model = f"openai-compatible:{llm.base_url}#{OPENAI_ID}"
    settings.slo = {"json_valid": 0.97, "error": 0.05}
    settings.breaker_min_calls = 3
    settings.breaker_cooldown_s = 3600
    return settings


def admin(live: LiveServer) -> str:
    """The operator's key: the SLOs count every tenant's calls."""
    return make_key(live.data_dir, "ops", frozenset({"admin", "operator", "metrics"}))


def slo_of(live: LiveServer, provider: str, model_id: str) -> dict[str, Any]:
    with live.client(admin(live)) as c:
        r = c.get("/v1/slo")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["window_s"] == 24 * 3600
    [model] = [m for m in body["models"] if (m["provider"], m["model_id"]) == (provider, model_id)]
    return model  # type: ignore[no-any-return]


def test_slo_is_the_operators(live: LiveServer) -> None:
    with live.client() as c:
        assert c.get("/v1/slo").status_code == 403
    with live.client(make_key(live.data_dir, "acme", frozenset({"admin"}))) as c:  # a tenant's admin: not its to see
        assert c.get("/v1/slo").status_code == 403 and c.get("/v1/models/stats").status_code == 403
    with live.client(admin(live)) as c:
        assert c.get("/v1/slo").json() == {"window_s": 24 * 3600, "models": []}


def test_reason_counts_as_structured_output(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(text='{"urgency": 4}', model=OPENAI_ID), Reply(text='{"urgency": "high"}', model=OPENAI_ID),
               Reply(text="four", model=OPENAI_ID), Reply(text='{"urgency": 2}', model=OPENAI_ID))  # fmt: skip
    with live.client() as c:
        first = c.post("/v1/reason", json={"prompt": "How urgent?", "schema": SCHEMA, "repairs": 0})
        second = c.post("/v1/reason", json={"prompt": "How urgent?", "schema": SCHEMA, "repairs": 0})
        third = c.post("/v1/reason", json={"prompt": "How urgent?", "schema": SCHEMA, "repairs": 1})
    assert first.json()["status"] == "succeeded" and second.json()["status"] == "partial_success"
    assert third.json()["status"] == "succeeded"
    with live.client(admin(live)) as c:
        [row] = c.get("/v1/models/stats").json()
    assert (row["calls"], row["structured_calls"]) == (4, 4)
    assert (row["json_valid_rate"], row["schema_valid_rate"]) == (0.75, 0.5)
    model = slo_of(live, "openai-compatible", OPENAI_ID)
    jv = model["metrics"]["json_valid"]
    assert (jv["n"], jv["rate"], jv["threshold"], jv["verdict"]) == (4, 0.75, 0.97, "violated")
    assert jv["low"] < 0.75 < jv["high"] < 0.97
    assert model["metrics"]["schema_valid"]["rate"] == 0.5 and model["metrics"]["error"]["verdict"] == "uncertain"
    assert (model["metrics"]["repair"]["rate"], model["metrics"]["repair"]["n"]) == (0.25, 4)  # reason's own re-ask
    assert model["latency_ms"]["n"] == 4 and model["latency_ms"]["p50"] > 0


def test_a_refused_call_is_in_the_envelope_and_the_stats(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Reply(refusal="I can't help with that.", model=OPENAI_ID, input_tokens=1500, output_tokens=9))
    with live.client() as c:
        body = c.post("/v1/chat", json={"message": "Something it refuses."}).json()
    env = body["envelope"]
    assert body["status"] == "failed" and env["errors"][0]["type"] == "refusal"
    [call] = env["metadata"]["model_calls"]  # it was charged: it must be listed
    assert (call["outcome"], call["input_tokens"], call["model_id"]) == ("refusal", 1500, OPENAI_ID)
    assert env["metadata"]["tokens"]["input"] == 1500
    model = slo_of(live, "openai-compatible", OPENAI_ID)
    assert (model["metrics"]["refusal"]["n"], model["metrics"]["refusal"]["rate"]) == (1, 1.0)


def test_a_cancelled_call_is_in_the_envelope_and_the_stats(live: LiveServer, llm: FakeOpenAIServer) -> None:
    llm.script(Hang(seconds=30, reply=Reply(text="too late", model=OPENAI_ID)))
    with live.client() as c:
        tid = c.post("/v1/tasks", json={"workflow": "ask", "input": {"question": "Slow?"}}).json()["id"]
        deadline = time.monotonic() + 10
        while not llm.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert llm.requests, "the model was never asked"
        assert c.post(f"/v1/tasks/{tid}/cancel").status_code in (200, 202)
        done = wait_terminal(c, tid)
    assert done["status"] == "cancelled"
    env: dict[str, Any] = done["envelope"]  # type: ignore[assignment]
    [call] = env["metadata"]["model_calls"]
    assert (call["outcome"], call["cancelled"], call["model_id"]) == ("cancelled", True, OPENAI_ID)
    model = slo_of(live, "openai-compatible", OPENAI_ID)
    cancelled, error = model["metrics"]["cancelled"], model["metrics"]["error"]
    assert (cancelled["n"], cancelled["rate"]) == (1, 1.0)
    assert error["n"] == 0  # a cancelled call says nothing about the model's errors


def test_a_fallback_chain_counts_its_failing_primary_and_opens_its_circuit(
    live: LiveServer, llm: FakeOpenAIServer, claude: FakeAnthropicServer
) -> None:
    claude.respond_with(lambda body: Fail(status=529))
    llm.respond_with(lambda body: Reply(text='"yes"', model=OPENAI_ID))
    chain = f"anthropic:{ANTHROPIC_ID},openai-compatible:{llm.base_url}#{OPENAI_ID}"
    envelopes = []
    with live.client() as c:
        for _ in range(4):
            r = c.post("/v1/reason", json={"prompt": "Urgent?", "schema": {"type": "string"}, "model": chain})
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            envelopes.append(r.json()["envelope"])
        events = []
        with c.stream("GET", f"/v1/tasks/{r.json()['task_id']}/events") as stream:
            for line in stream.iter_lines():
                events.append(line)
                if line == "event: end":
                    break
    outcomes = [[(m["provider"], m["outcome"]) for m in e["metadata"]["model_calls"]] for e in envelopes]
    failed_then_answered = [("anthropic", "http_529"), ("openai-compatible", "ok")]
    assert outcomes == [failed_then_answered] * 3 + [[("anthropic", "skipped"), ("openai-compatible", "ok")]]
    assert len(claude.requests) == 3  # the fourth call did not try the primary first
    skipped = envelopes[3]["metadata"]["model_calls"][0]
    assert skipped["model_id"] == ANTHROPIC_ID and skipped["verdicts"]["error"] == "violated"
    [circuit] = [json.loads(events[i + 1].removeprefix("data: ")) for i, e in enumerate(events)
                 if e == "event: model_circuit"]  # fmt: skip
    assert (circuit["model_id"], circuit["previous"], circuit["state"]) == (ANTHROPIC_ID, "closed", "open")
    with live.client(admin(live)) as c:
        stats = {(s["provider"], s["model_id"]): s for s in c.get("/v1/models/stats").json()}
    assert (stats["anthropic", ANTHROPIC_ID]["calls"], stats["anthropic", ANTHROPIC_ID]["errors"]) == (3, 3)
    assert (stats["openai-compatible", OPENAI_ID]["calls"], stats["openai-compatible", OPENAI_ID]["errors"]) == (4, 0)
    primary = slo_of(live, "anthropic", ANTHROPIC_ID)["metrics"]
    assert (primary["error"]["verdict"], primary["error_5xx"]["rate"], primary["error"]["n"]) == ("violated", 1.0, 3)
    backup = slo_of(live, "openai-compatible", OPENAI_ID)["metrics"]
    assert (backup["fallback"]["rate"], backup["error"]["verdict"], backup["json_valid"]["n"]) == (1.0, "uncertain", 4)
    with live.client(admin(live)) as c:
        metrics = c.get("/metrics").text
    assert f'keel_slo_verdict{{metric="error",model_id="{ANTHROPIC_ID}",provider="anthropic"}} 2.0' in metrics


def test_a_circuit_opens_on_the_calls_of_every_replica(
    settings: Settings, llm: FakeOpenAIServer, claude: FakeAnthropicServer
) -> None:
    """Another replica saw the primary fail (its calls are in the shared stats): this one skips it on its first call."""
    import asyncio

    from conftest import start_server
    from keel.backends import open_store
    from keel.memory.types import ModelCallRecord

    async def elsewhere() -> None:
        store = open_store(settings.resolved_store_url)
        failed = ModelCallRecord(provider="anthropic", requested_model=ANTHROPIC_ID, model_id=ANTHROPIC_ID,
                                 at=time.time() - 30, error=True, error_class="5xx", outcome="http_529")  # fmt: skip
        await asyncio.gather(*(store.record_model_call("other", failed) for _ in range(5)))
        await store.aclose()

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(elsewhere())
    key = make_key(settings.data_dir, "acme", frozenset({"tasks:read", "tasks:write"}))
    llm.respond_with(lambda body: Reply(text='"yes"', model=OPENAI_ID))
    chain = f"anthropic:{ANTHROPIC_ID},openai-compatible:{llm.base_url}#{OPENAI_ID}"
    server, thread = start_server(settings)
    live = LiveServer(url=f"http://127.0.0.1:{settings.port}", data_dir=settings.data_dir, settings=settings, key=key)
    try:
        with live.client() as c:
            r = c.post("/v1/reason", json={"prompt": "Urgent?", "schema": {"type": "string"}, "model": chain})
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    skipped, answered = r.json()["envelope"]["metadata"]["model_calls"]
    assert (skipped["model_id"], skipped["outcome"]) == (ANTHROPIC_ID, "skipped")
    assert skipped["reason"].startswith("across replicas: error 1.000")
    assert answered["provider"] == "openai-compatible" and claude.requests == []
