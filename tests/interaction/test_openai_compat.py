"""The OpenAI-compatible edge, driven by the official ``openai`` SDK (pinned in the ``dev`` extra) against a real
``keel serve`` subprocess: the Responses API (background, streaming with a dropped connection resumed by sequence
number, cancel, structured output, session memory, a keel workflow), Chat Completions and Models.

The server's default model is a loopback fake provider (scripted per test); ``model="test"`` is keel's echo model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import free_port, make_key
from keel.testing.analyst import ScriptedAnalyst
from keel.testing.fake_llm import FakeOpenAIServer, Reply
from keel.testing.pdfs import make_pdf
from keel_processes import KeelProcess, Servers

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


@dataclass
class Env:
    keel: KeelProcess
    fake: FakeOpenAIServer
    key: str

    @property
    def fake_model(self) -> str:
        return f"openai-compatible:{self.fake.base_url}#analyst-2026-01-01"

    def sdk(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=f"{self.keel.url}/v1", api_key=key or self.key, max_retries=0, timeout=30)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.keel.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("openai")
    data = root / "data"
    data.mkdir()
    key = make_key(data, "acme", frozenset({"tasks:read", "tasks:write"}))
    servers = Servers(root)
    with FakeOpenAIServer(api_key="sk-test") as fake:
        settings = {
            "KEEL_DEFAULT_MODEL": f"openai-compatible:{fake.base_url}#analyst-2026-01-01",
            "OPENAI_COMPATIBLE_API_KEY": "sk-test",
            "KEEL_MODEL_PRICES": json.dumps({"analyst": {"input": 1.0, "output": 2.0, "context_window": 16_000}}),
            "KEEL_EMBEDDING_MODEL": "hash:64",
        }
        try:
            yield Env(keel=servers.start(free_port(), data, env=settings, timeout=30), fake=fake, key=key)
        finally:
            servers.stop_all()


def settle(client: OpenAI, resp_id: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.responses.retrieve(resp_id)
        if resp.status not in ("queued", "in_progress"):
            return resp
        time.sleep(0.05)
    raise AssertionError(f"{resp_id} did not finish in {timeout}s")


# -- Responses ---------------------------------------------------------------------------------------------------


def test_background_then_retrieve_until_completed(env: Env) -> None:
    client = env.sdk()
    created = client.responses.create(model="test", input="durable answers survive restarts", background=True)
    assert created.id.startswith("resp_") and created.status in ("queued", "in_progress", "completed")
    done = settle(client, created.id)
    assert done.status == "completed" and done.output_text == "durable answers survive restarts"
    assert done.usage is not None and done.usage.output_tokens == 4
    extension = done.model_extra["keel"]  # keel's envelope, nothing lost
    assert extension["envelope"]["status"] == "success" and extension["task_id"] == "tsk_" + created.id[5:]
    with env.http() as http:  # the same response is a keel task
        assert http.get(f"/v1/tasks/{extension['task_id']}").json()["status"] == "succeeded"


def test_a_dropped_stream_resumes_by_sequence_number_with_no_gap_and_no_duplicate(env: Env) -> None:
    client = env.sdk()
    words = " ".join(f"word{i}" for i in range(40))
    first: list[dict[str, Any]] = []
    with client.responses.create(model="test", input=words, stream=True) as stream:
        for event in stream:
            first.append(event.model_dump())
            if len(first) == 6:
                break  # the connection drops here
    resp_id = first[0]["response"]["id"]
    rest = [
        e.model_dump()
        for e in client.responses.retrieve(resp_id, stream=True, starting_after=first[-1]["sequence_number"])
    ]
    joined = first + rest
    assert [e["sequence_number"] for e in joined] == list(range(len(joined)))
    whole = [e.model_dump() for e in client.responses.retrieve(resp_id, stream=True, starting_after=-1)]
    assert whole == joined  # the log walked again gives the same events under the same numbers
    types = [e["type"] for e in joined]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.in_progress" in types and "keel.event" in types  # keel's own events pass through the SDK
    text = "".join(e["delta"] for e in joined if e["type"] == "response.output_text.delta")
    assert text == words and joined[-1]["response"]["output_text"] == words
    [done] = [e for e in joined if e["type"] == "response.output_text.done"]
    assert done["text"] == words


def test_cancel_a_running_response_keeps_its_partial_output(env: Env) -> None:
    client = env.sdk()
    created = client.responses.create(
        model="keel:diagnostic",
        input={"steps": 60, "step_seconds": 0.2},  # type: ignore[arg-type]  # a keel workflow's input
        background=True,
    )
    deadline = time.monotonic() + 20
    while client.responses.retrieve(created.id).model_extra["keel"]["progress"] < 0.05:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    partial = json.loads(cancelled.output_text)["completed_steps"]
    assert partial and len(partial) < 60
    assert cancelled.model_extra["keel"]["envelope"]["status"] == "partial_success"
    assert client.responses.cancel(created.id).status == "cancelled"  # idempotent


def test_structured_output_through_text_format_json_schema(env: Env) -> None:
    env.fake.reset()
    env.fake.script(Reply(text='{"city": "Paris", "population": 2100000}'))
    client = env.sdk()
    fmt: Any = {"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}}
    resp = client.responses.create(model=env.fake_model, input="The largest city of France?", text=fmt)
    assert resp.status == "completed" and json.loads(resp.output_text) == {"city": "Paris", "population": 2100000}
    assert env.fake.requests[-1]["response_format"]["json_schema"]["schema"] == CITY_SCHEMA
    env.fake.script(Reply(text='{"city": 3}'))
    bad = client.responses.create(model=env.fake_model, input="The largest city of France?", text=fmt)
    assert bad.status == "failed" and bad.error is not None and bad.error.code == "schema_violation"
    with pytest.raises(openai.UnprocessableEntityError):
        client.responses.create(
            model="test", input="x", text={"format": {"type": "json_schema", "name": "n", "schema": {"type": 7}}}
        )


def test_previous_response_id_continues_the_conversation(env: Env) -> None:
    env.fake.reset()
    env.fake.script(Reply(text="Nice to meet you, Ada."), Reply(text="You are Ada."))
    client = env.sdk()
    first = client.responses.create(model=env.fake_model, input="I am Ada.", instructions="Be brief.")
    second = client.responses.create(model=env.fake_model, input="Who am I?", previous_response_id=first.id)
    assert second.output_text == "You are Ada." and second.previous_response_id == first.id
    sent = [(m["role"], m["content"]) for m in env.fake.requests[-1]["messages"]]
    assert sent == [("user", "I am Ada."), ("assistant", "Nice to meet you, Ada."), ("user", "Who am I?")]


def test_a_keel_workflow_runs_through_responses_create(env: Env) -> None:
    analyst = ScriptedAnalyst()
    env.fake.reset()
    env.fake.respond_with(analyst.http_reply)
    texts = {
        "a.pdf": "AGREEMENT A\nPayment is due within 30 days of the invoice date.",
        "b.pdf": "AGREEMENT B\nInvoices are payable within 60 days; late payments accrue 2% a month.",
    }
    with env.http() as http:
        docs = []
        for name, text in texts.items():
            r = http.post("/v1/documents", files={"file": (name, make_pdf([text]), "application/pdf")})
            assert r.status_code == 201, r.text
            docs.append(r.json()["id"])
    client = env.sdk()
    request = {"request": "Analyse these PDFs, compare insights, and tell me the risks.", "documents": docs}
    created = client.responses.create(model="keel:document_analysis", input=request, background=True)  # type: ignore[arg-type]
    done = settle(client, created.id, timeout=60)
    env.fake.respond_with(None)
    assert done.status == "completed", done.model_extra["keel"]["envelope"]
    result = json.loads(done.output_text)
    assert result["risks"] and result["comparison"]["conflicts"][0]["documents"] == docs
    assert done.model_extra["keel"]["envelope"]["result"] == result
    assert done.model == "keel:document_analysis"


def test_errors_are_problems_with_the_status_codes_the_sdk_maps(env: Env) -> None:
    with pytest.raises(openai.AuthenticationError):
        env.sdk("keel_not_a_key").responses.create(model="test", input="x")
    client = env.sdk()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_0000000000000000")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("tsk_0000000000000000")
    with pytest.raises(openai.UnprocessableEntityError):
        client.responses.create(model="keel:no_such_workflow", input="{}")
    with pytest.raises(openai.UnprocessableEntityError):
        client.responses.create(model="test", input="x", tools=["no_such_tool"])  # type: ignore[list-item]
    workflow = client.responses.create(model="keel:diagnostic", input='{"steps": 1, "step_seconds": 0}')
    with pytest.raises(openai.UnprocessableEntityError):
        client.responses.create(model="test", input="go on", previous_response_id=workflow.id)
    running = client.responses.create(
        model="keel:diagnostic", input='{"steps": 20, "step_seconds": 1}', background=True
    )
    with pytest.raises(openai.ConflictError):  # still running: cancel it first
        client.responses.delete(running.id)
    client.responses.cancel(running.id)
    assert client.responses.retrieve(workflow.id).status == "completed"
    client.responses.delete(workflow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(workflow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(workflow.id)


# -- Chat Completions and Models --------------------------------------------------------------------------------


def test_chat_completions_not_streamed_and_streamed(env: Env) -> None:
    client = env.sdk()
    done = client.chat.completions.create(
        model="test", messages=[{"role": "system", "content": "Echo."}, {"role": "user", "content": "hello there"}]
    )
    assert done.choices[0].message.content == "hello there" and done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 2
    chunks = list(
        client.chat.completions.create(
            model="test",
            messages=[{"role": "user", "content": "one two three four"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_chat_completions_keep_a_session(env: Env) -> None:
    env.fake.reset()
    env.fake.script(Reply(text="Hi Grace."), Reply(text="Grace."))
    client = env.sdk()
    session = {"session": "ses_openai_chat_1"}
    client.chat.completions.create(
        model=env.fake_model, messages=[{"role": "user", "content": "I am Grace."}], extra_body=session
    )
    again = client.chat.completions.create(
        model=env.fake_model, messages=[{"role": "user", "content": "My name?"}], extra_body=session
    )
    assert again.choices[0].message.content == "Grace."
    sent = [(m["role"], m["content"]) for m in env.fake.requests[-1]["messages"]]
    assert sent == [("user", "I am Grace."), ("assistant", "Hi Grace."), ("user", "My name?")]


def test_models_list_and_retrieve(env: Env) -> None:
    client = env.sdk()
    ids = [m.id for m in client.models.list()]
    assert ids[0] == env.fake_model and "keel:document_analysis" in ids and "keel:respond" in ids
    assert client.models.retrieve("keel:document_analysis").owned_by == "keel"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
