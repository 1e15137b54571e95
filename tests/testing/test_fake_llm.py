"""The loopback fake LLM providers speak the real OpenAI / Anthropic wire formats, verified with plain httpx."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from keel.testing.fake_llm import Cut, Fail, FakeAnthropicServer, FakeOpenAIServer, Hang, Reply, ToolCallSpec

CLAUDE = "claude-3-5-haiku-20241022"
OPENAI_BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY: dict[str, Any] = {**OPENAI_BODY, "model": CLAUDE, "max_tokens": 64}
ANTHROPIC_HEADERS = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def _openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def _anthropic() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer() as srv:
        yield srv


@pytest.fixture
def oai(_openai: FakeOpenAIServer) -> FakeOpenAIServer:
    _openai.reset()
    return _openai


@pytest.fixture
def ant(_anthropic: FakeAnthropicServer) -> FakeAnthropicServer:
    _anthropic.reset()
    return _anthropic


@pytest.fixture
def oai_client(oai: FakeOpenAIServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": "Bearer sk-test"}
    with httpx.Client(base_url=oai.base_url, headers=headers, timeout=5) as client:
        yield client


@pytest.fixture
def ant_client(ant: FakeAnthropicServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ant.base_url, headers=ANTHROPIC_HEADERS, timeout=5) as client:
        yield client


def oai_stream(client: httpx.Client, **extra: Any) -> list[str]:
    """The raw ``data:`` payloads of a streamed chat completion."""
    with connect_sse(client, "POST", "/chat/completions", json={**OPENAI_BODY, "stream": True, **extra}) as es:
        assert es.response.headers["content-type"].startswith("text/event-stream")
        return [sse.data for sse in es.iter_sse()]


def ant_stream(client: httpx.Client) -> list[ServerSentEvent]:
    with connect_sse(client, "POST", "/v1/messages", json={**ANTHROPIC_BODY, "stream": True}) as es:
        assert es.response.headers["content-type"].startswith("text/event-stream")
        return list(es.iter_sse())


def chunks(datas: list[str]) -> list[dict[str, Any]]:
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


# -- OpenAI ------------------------------------------------------------------------------------------------------------


def test_openai_non_streamed_reply_shape_and_recording(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Reply(text="Hello there", input_tokens=7, output_tokens=3))
    r = oai_client.post("/chat/completions", json=OPENAI_BODY, headers={"X-Trace": "abc"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "gpt-4o-mini-2024-07-18"
    assert body["system_fingerprint"] == "fp_fake"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == "Hello there"
    assert choice["message"]["refusal"] is None and "tool_calls" not in choice["message"]
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == 10
    assert oai.requests == [OPENAI_BODY]
    assert oai.headers[0]["authorization"] == "Bearer sk-test" and oai.headers[0]["x-trace"] == "abc"
    assert oai.pending == 0


def test_openai_streamed_text_reassembles(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Reply(text="The quick brown fox", chunk_chars=3, model="llama3"))
    parsed = chunks(oai_stream(oai_client))
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "llama3" for c in parsed)
    assert len({c["id"] for c in parsed}) == 1 and "usage" not in parsed[0]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert parsed[0]["choices"][0]["delta"]["content"] == ""
    middle = parsed[1:-1]
    assert [c["choices"][0]["delta"]["content"] for c in middle] == ["The", " qu", "ick", " br", "own", " fo", "x"]
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed[:-1])
    assert parsed[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_openai_stream_include_usage(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Reply(text="hi", input_tokens=12, output_tokens=2))
    parsed = chunks(oai_stream(oai_client, stream_options={"include_usage": True}))
    assert all(c["usage"] is None for c in parsed[:-1])
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"]["prompt_tokens"] == 12 and parsed[-1]["usage"]["total_tokens"] == 14
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"


def test_openai_tool_calls_non_streamed(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    calls = [
        ToolCallSpec(name="get_weather", arguments={"city": "Paris"}),
        ToolCallSpec(name="broken", arguments='{"city": "Par', id="call_custom"),
    ]
    oai.script(Reply(tool_calls=calls, finish_reason="tool_calls"))
    choice = oai_client.post("/chat/completions", json=OPENAI_BODY).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    first, second = message["tool_calls"]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert second["id"] == "call_custom" and second["function"]["arguments"] == '{"city": "Par'


def test_openai_tool_calls_streamed(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    calls = [ToolCallSpec(name="a", arguments={"x": 1, "y": [1, 2]}), ToolCallSpec(name="b", arguments="not json")]
    oai.script(Reply(text="Let me check.", tool_calls=calls, finish_reason="tool_calls", chunk_chars=5))
    parsed = chunks(oai_stream(oai_client))
    text = ""
    tools: dict[int, dict[str, str]] = {}
    for c in parsed:
        delta = c["choices"][0]["delta"]
        text += delta.get("content") or ""
        for tc in delta.get("tool_calls", []):
            slot = tools.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            if "id" in tc:
                assert tc["type"] == "function"
                slot["id"], slot["name"] = tc["id"], tc["function"]["name"]
            slot["arguments"] += tc["function"]["arguments"]
    assert text == "Let me check."
    assert tools[0]["name"] == "a" and json.loads(tools[0]["arguments"]) == {"x": 1, "y": [1, 2]}
    assert tools[1]["name"] == "b" and tools[1]["arguments"] == "not json"
    assert tools[0]["id"].startswith("call_") and tools[0]["id"] != tools[1]["id"]
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_length_and_refusal(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(
        Reply(text="truncat", finish_reason="length"),
        Reply(refusal="I can't help with that."),
        Reply(refusal="No way, sorry.", chunk_chars=4),
    )
    assert oai_client.post("/chat/completions", json=OPENAI_BODY).json()["choices"][0]["finish_reason"] == "length"
    message = oai_client.post("/chat/completions", json=OPENAI_BODY).json()["choices"][0]["message"]
    assert message["content"] is None and message["refusal"] == "I can't help with that."
    parsed = chunks(oai_stream(oai_client))
    assert "".join(c["choices"][0]["delta"].get("refusal") or "" for c in parsed) == "No way, sorry."


def test_openai_errors(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Fail(status=429, retry_after=2), Fail(status=500, message="boom"), Fail(status=503, retry_after=0.5))
    r = oai_client.post("/chat/completions", json=OPENAI_BODY)
    assert r.status_code == 429 and r.headers["retry-after"] == "2" and r.headers["retry-after-ms"] == "2000"
    assert r.json() == {
        "error": {"message": "scripted failure", "type": "rate_limit_error", "param": None, "code": None}
    }
    r = oai_client.post("/chat/completions", json={**OPENAI_BODY, "stream": True})
    assert r.status_code == 500 and "retry-after" not in r.headers
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["message"] == "boom"
    r = oai_client.post("/chat/completions", json=OPENAI_BODY)
    assert r.status_code == 503 and r.headers["retry-after"] == "0.5"


def test_openai_auth_validation_and_exhaustion(oai: FakeOpenAIServer) -> None:
    oai.script(Reply(text="kept"))
    with httpx.Client(base_url=oai.base_url, timeout=5) as client:
        r = client.post("/chat/completions", json=OPENAI_BODY, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/chat/completions", json=OPENAI_BODY).status_code == 401
        client.headers["Authorization"] = "Bearer sk-test"
        r = client.post("/chat/completions", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert client.post("/chat/completions", content=b"{nope").status_code == 400
        assert client.post("/chat/completions", json=OPENAI_BODY).json()["choices"][0]["message"]["content"] == "kept"
        r = client.post("/chat/completions", json=OPENAI_BODY)
        assert r.status_code == 500 and r.json()["error"]["message"] == "fake server: script exhausted"
        assert client.get("/models").status_code == 404
    assert len(oai.requests) == len(oai.headers) == 6
    assert oai.requests[3] == {"_raw": "{nope"}


def test_openai_cut_streamed(oai: FakeOpenAIServer, oai_client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    oai.script(Cut(reply=Reply(text="abcdefghijklmnop", chunk_chars=2), after_chunks=3))
    datas: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        with connect_sse(oai_client, "POST", "/chat/completions", json={**OPENAI_BODY, "stream": True}) as es:
            datas.extend(sse.data for sse in es.iter_sse())
    assert "[DONE]" not in datas
    deltas = [json.loads(d)["choices"][0] for d in datas]
    assert [d["delta"].get("content") for d in deltas] == ["", "ab", "cd", "ef"]
    assert all(d["finish_reason"] is None for d in deltas)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_openai_cut_non_streamed(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Cut(reply=Reply(text="hello")), Reply(text="after"))
    with pytest.raises(httpx.RemoteProtocolError, match="received .* bytes, expected"):
        oai_client.post("/chat/completions", json=OPENAI_BODY)
    # The server keeps serving after a cut.
    assert oai_client.post("/chat/completions", json=OPENAI_BODY).json()["choices"][0]["message"]["content"] == "after"


def test_openai_cut_beyond_content_still_has_no_terminator(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Cut(reply=Reply(text="hi"), after_chunks=10))
    datas: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with connect_sse(oai_client, "POST", "/chat/completions", json={**OPENAI_BODY, "stream": True}) as es:
            datas.extend(sse.data for sse in es.iter_sse())
    assert [json.loads(d)["choices"][0]["finish_reason"] for d in datas] == [None, None]


def test_openai_hang_streamed_then_completes(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Hang(seconds=0.3, reply=Reply(text="slow reply", chunk_chars=5)))
    started = time.monotonic()
    stamps: list[tuple[float, str]] = []
    with connect_sse(oai_client, "POST", "/chat/completions", json={**OPENAI_BODY, "stream": True}) as es:
        for sse in es.iter_sse():
            stamps.append((time.monotonic() - started, sse.data))
    assert stamps[-1][1] == "[DONE]"
    assert json.loads(stamps[1][1])["choices"][0]["delta"]["content"] == "slow "
    assert stamps[1][0] < 0.25 and stamps[2][0] >= 0.25


def test_openai_hang_read_timeout(oai: FakeOpenAIServer, oai_client: httpx.Client) -> None:
    oai.script(Hang(seconds=0.5), Reply(text="next"))
    with pytest.raises(httpx.ReadTimeout):
        oai_client.post("/chat/completions", json=OPENAI_BODY, timeout=0.1)
    assert oai_client.post("/chat/completions", json=OPENAI_BODY).json()["choices"][0]["message"]["content"] == "next"


def test_stop_aborts_hangs_promptly_and_no_auth_mode() -> None:
    srv = FakeOpenAIServer(api_key=None).start()
    srv.script(Hang(seconds=30), Hang(seconds=30))
    outcomes: dict[str, object] = {}

    def call(stream: bool) -> None:
        try:
            with httpx.stream("POST", srv.base_url + "/chat/completions", json={**OPENAI_BODY, "stream": stream}) as r:
                outcomes[f"status-{stream}"] = r.status_code
                r.read()
        except httpx.HTTPError as exc:
            outcomes[f"error-{stream}"] = exc

    callers = [threading.Thread(target=call, args=(stream,)) for stream in (True, False)]
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 5
    while len(srv.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(srv.requests) == 2, "no auth header needed when api_key=None"
    time.sleep(0.05)
    assert "status-False" not in outcomes  # a non-streamed hang sends nothing, not even headers
    started = time.monotonic()
    srv.stop()
    for caller in callers:
        caller.join(timeout=5)
        assert not caller.is_alive()
    assert time.monotonic() - started < 2
    assert outcomes["status-True"] == 200 and isinstance(outcomes["error-True"], httpx.RemoteProtocolError)
    assert outcomes["status-False"] == 503
    with pytest.raises(RuntimeError):
        srv.base_url  # noqa: B018


# -- Anthropic ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")],
)
def test_anthropic_non_streamed_shape(
    ant: FakeAnthropicServer, ant_client: httpx.Client, finish: str, stop_reason: str
) -> None:
    calls = [ToolCallSpec(name="lookup", arguments={"q": "x"}), ToolCallSpec(name="bad", arguments="{oops")]
    ant.script(Reply(text="Sure.", tool_calls=calls, finish_reason=finish, model=CLAUDE, input_tokens=9))
    r = ant_client.post("/v1/messages", json=ANTHROPIC_BODY)
    assert r.status_code == 200 and r.headers["request-id"].startswith("req_")
    body = r.json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == CLAUDE and body["stop_reason"] == stop_reason and body["stop_sequence"] is None
    text, tool, bad = body["content"]
    assert text == {"type": "text", "text": "Sure."}
    assert tool["type"] == "tool_use" and tool["id"].startswith("toolu_") and tool["name"] == "lookup"
    assert tool["input"] == {"q": "x"}
    assert bad["input"] == "{oops"  # invalid JSON str arguments are passed through as a string
    assert body["usage"]["input_tokens"] == 9 and body["usage"]["output_tokens"] == 5
    assert ant.requests == [ANTHROPIC_BODY] and ant.headers[0]["anthropic-version"] == "2023-06-01"


def test_anthropic_streamed_events(ant: FakeAnthropicServer, ant_client: httpx.Client) -> None:
    calls = [ToolCallSpec(name="lookup", arguments={"query": "weather in Paris"}, id="toolu_x")]
    ant.script(Reply(text="Checking now", tool_calls=calls, finish_reason="tool_calls", model=CLAUDE, chunk_chars=5))
    events = ant_stream(ant_client)
    kinds = [e.event for e in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert all(e.json()["type"] == e.event for e in events)
    start = events[0].json()["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == 10
    assert start["model"] == CLAUDE
    blocks: dict[int, dict[str, Any]] = {}
    for e in events:
        data = e.json()
        if e.event == "content_block_start":
            blocks[data["index"]] = {**data["content_block"], "buf": ""}
        elif e.event == "content_block_delta":
            delta = data["delta"]
            blocks[data["index"]]["buf"] += delta["text"] if delta["type"] == "text_delta" else delta["partial_json"]
    assert blocks[0]["type"] == "text" and blocks[0]["buf"] == "Checking now"
    assert blocks[1]["type"] == "tool_use" and blocks[1]["id"] == "toolu_x" and blocks[1]["input"] == {}
    assert json.loads(blocks[1]["buf"]) == {"query": "weather in Paris"}
    assert kinds.count("content_block_stop") == 2
    final = events[-2].json()
    assert final["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert final["usage"] == {"output_tokens": 5}


def test_anthropic_refusal(ant: FakeAnthropicServer, ant_client: httpx.Client) -> None:
    ant.script(Reply(refusal="I won't do that.", model=CLAUDE), Reply(refusal="Nope.", model=CLAUDE))
    body = ant_client.post("/v1/messages", json=ANTHROPIC_BODY).json()
    assert body["stop_reason"] == "refusal" and body["content"] == [{"type": "text", "text": "I won't do that."}]
    events = ant_stream(ant_client)
    assert events[-2].json()["delta"]["stop_reason"] == "refusal"
    text = "".join(e.json()["delta"]["text"] for e in events if e.event == "content_block_delta")
    assert text == "Nope."


def test_anthropic_errors(ant: FakeAnthropicServer, ant_client: httpx.Client) -> None:
    ant.script(Fail(status=429, retry_after=3), Fail(status=529, message="Overloaded"), Fail(status=500))
    r = ant_client.post("/v1/messages", json=ANTHROPIC_BODY)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    body = r.json()
    assert body["type"] == "error" and body["error"] == {"type": "rate_limit_error", "message": "scripted failure"}
    r = ant_client.post("/v1/messages", json={**ANTHROPIC_BODY, "stream": True})
    assert r.status_code == 529 and r.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    r = ant_client.post("/v1/messages", json=ANTHROPIC_BODY)
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error" and "retry-after" not in r.headers


def test_anthropic_auth_version_validation_exhaustion(ant: FakeAnthropicServer) -> None:
    with httpx.Client(base_url=ant.base_url, timeout=5) as client:
        r = client.post("/v1/messages", json=ANTHROPIC_BODY, headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = client.post("/v1/messages", json=ANTHROPIC_BODY, headers={"x-api-key": "sk-test"})
        assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
        client.headers.update(ANTHROPIC_HEADERS)
        r = client.post("/v1/messages", json={k: v for k, v in ANTHROPIC_BODY.items() if k != "max_tokens"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = client.post("/v1/messages", json=ANTHROPIC_BODY)
        assert r.status_code == 500 and r.json()["error"]["message"] == "fake server: script exhausted"
    assert len(ant.requests) == 4 and "x-api-key" not in ant.headers[0] and "anthropic-version" not in ant.headers[1]


def test_anthropic_cut_streamed(ant: FakeAnthropicServer, ant_client: httpx.Client) -> None:
    ant.script(Cut(reply=Reply(text="abcdefgh", chunk_chars=2, model=CLAUDE), after_chunks=2))
    events: list[ServerSentEvent] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with connect_sse(ant_client, "POST", "/v1/messages", json={**ANTHROPIC_BODY, "stream": True}) as es:
            events.extend(es.iter_sse())
    assert [e.event for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
    ]


def test_anthropic_cut_non_streamed(ant: FakeAnthropicServer, ant_client: httpx.Client) -> None:
    ant.script(Cut(reply=Reply(text="hello", model=CLAUDE)))
    with pytest.raises(httpx.RemoteProtocolError):
        ant_client.post("/v1/messages", json=ANTHROPIC_BODY)


def test_anthropic_hang_streamed_sends_first_delta(ant: FakeAnthropicServer, ant_client: httpx.Client) -> None:
    ant.script(Hang(seconds=0.5, reply=Reply(text="waiting...", model=CLAUDE)))
    seen: list[str] = []
    with pytest.raises(httpx.ReadTimeout):
        with connect_sse(
            ant_client, "POST", "/v1/messages", json={**ANTHROPIC_BODY, "stream": True}, timeout=0.2
        ) as es:
            seen.extend(e.event for e in es.iter_sse())
    assert seen == ["message_start", "ping", "content_block_start", "content_block_delta"]


async def test_async_client_sees_the_same_cut(oai: FakeOpenAIServer) -> None:
    oai.script(Cut(reply=Reply(text="abcdef"), after_chunks=1))
    headers = {"Authorization": "Bearer sk-test"}
    async with httpx.AsyncClient(base_url=oai.base_url, headers=headers, timeout=5) as client:
        received: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/chat/completions", json={**OPENAI_BODY, "stream": True}) as r:
                async for line in r.aiter_lines():
                    received.append(line)
    assert not any("[DONE]" in line for line in received)
