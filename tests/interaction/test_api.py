"""HTTP contract: 202 + Location, polling, auth, problem details, idempotency, cancellation."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, rule

from conftest import LiveServer, wait_terminal

DIAG = {"workflow": "diagnostic", "input": {"steps": 1, "step_seconds": 0}}


def task_count(live: LiveServer) -> int:
    with live.client() as c:
        return len(c.get("/v1/tasks", params={"limit": 200}).json()["items"])


def assert_problem(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, object] = r.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert "Traceback" not in r.text and "/src/keel" not in r.text
    return body


def test_submit_poll_and_envelope(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 2, "step_seconds": 0.4}})
        assert r.status_code == 202
        body = r.json()
        assert set(body) == {"id", "status", "links", "estimated_duration_s"}
        assert body["estimated_duration_s"] == pytest.approx(0.8)
        assert r.headers["location"] == body["links"]["self"]
        polled = c.get(body["links"]["self"])
        assert polled.status_code == 200 and polled.headers["retry-after"] in ("1", "2")
        assert polled.json()["envelope"] is None
        done = wait_terminal(c, body["id"])
        final = c.get(body["links"]["self"])
        assert "retry-after" not in final.headers
        assert done["status"] == "succeeded" and done["progress"] == 1.0, done["envelope"]
        env = done["envelope"]
        assert isinstance(env, dict)
        assert env["status"] == "success" and env["errors"] == []
        assert [s["name"] for s in env["metadata"]["steps"]] == ["step-1", "step-2"]
        assert env["result"]["message"] == "diagnostic ran 2 steps"


def test_failed_step_keeps_partial_result(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 4, "step_seconds": 0, "fail_at": 3}})
        done = wait_terminal(c, r.json()["id"])
        assert done["status"] == "failed"
        env = done["envelope"]
        assert isinstance(env, dict)
        assert env["status"] == "failed"
        assert env["result"] == {"completed_steps": [1, 2]}
        (err,) = env["errors"]
        assert err["type"] == "diagnostic_failure" and err["step"] == "step-3"


def test_cancel_running_keeps_partial_result_and_is_idempotent(live: LiveServer) -> None:
    with live.client() as c:
        tid = c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": 50, "step_seconds": 0.2}}).json()[
            "id"
        ]
        deadline = time.monotonic() + 10
        while c.get(f"/v1/tasks/{tid}").json()["progress"] < 0.04 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        first = c.post(f"/v1/tasks/{tid}/cancel")
        assert first.status_code in (200, 202)
        done = wait_terminal(c, tid, timeout=5)
        assert time.monotonic() - started < 2, "cancellation must stop the running step promptly"
        assert done["status"] == "cancelled"
        env = done["envelope"]
        assert isinstance(env, dict)
        assert env["status"] == "partial_success"
        assert len(env["result"]["completed_steps"]) >= 2
        assert any(e["type"] == "cancelled" for e in env["errors"])
        again = c.post(f"/v1/tasks/{tid}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_list_paginates_and_filters(live: LiveServer) -> None:
    with live.client() as c:
        ids = [c.post("/v1/tasks", json=DIAG).json()["id"] for _ in range(5)]
        for tid in ids:
            wait_terminal(c, tid)
        page = c.get("/v1/tasks", params={"limit": 2}).json()
        assert [t["id"] for t in page["items"]] == ids[::-1][:2]
        rest = c.get("/v1/tasks", params={"limit": 10, "cursor": page["next_cursor"]}).json()
        assert [t["id"] for t in rest["items"]] == ids[::-1][2:] and rest["next_cursor"] is None
        assert c.get("/v1/tasks", params={"status": "failed"}).json()["items"] == []
        assert len(c.get("/v1/tasks", params={"status": ["succeeded", "failed"]}).json()["items"]) == 5
        assert_problem(c.get("/v1/tasks", params={"status": "bogus"}), 422)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"workflow": "diagnostic", "input": {', {"content-type": "application/json"}),
        (b"not json at all", {"content-type": "application/json"}),
        (json.dumps({"workflow": 42}).encode(), {"content-type": "application/json"}),
        (json.dumps({"workflow": "diagnostic", "input": {"steps": "many"}}).encode(), {}),
        (json.dumps({"workflow": "diagnostic", "input": {"steps": 1, "bogus": 1}}).encode(), {}),
        (json.dumps({**DIAG, "unknown_field": True}).encode(), {}),
        (json.dumps({"workflow": "no-such-workflow"}).encode(), {}),
        (json.dumps({**DIAG, "webhook": {"url": "https://x.example", "secret": "short"}}).encode(), {}),
        (json.dumps({**DIAG, "webhook": {"url": "http://10.0.0.1/h", "secret": "whsec_" + "A" * 40}}).encode(), {}),
        (b"[]", {"content-type": "application/json"}),
    ],
    ids=[
        "truncated-json",
        "not-json",
        "wrong-type",
        "wrong-input-type",
        "unknown-input-field",
        "unknown-field",
        "unknown-workflow",
        "bad-webhook-secret",
        "ssrf-webhook",
        "array",
    ],
)
def test_bad_input_is_problem_json_and_creates_nothing(
    live: LiveServer, content: bytes, headers: dict[str, str]
) -> None:
    with live.client() as c:
        r = c.post("/v1/tasks", content=content, headers={"content-type": "application/json", **headers})
    body = assert_problem(r, 422)
    assert body["detail"]
    assert task_count(live) == 0


def test_huge_body_is_413(live: LiveServer) -> None:
    big = {**DIAG, "metadata": {"blob": "x" * (live.settings.max_body_bytes + 10)}}
    with live.client() as c:
        assert_problem(c.post("/v1/tasks", json=big), 413)

        def chunks():  # no Content-Length: the limit must still hold while streaming
            yield b'{"workflow": "diagnostic", "metadata": {"blob": "'
            for _ in range(live.settings.max_body_bytes // 1000 + 5):
                yield b"x" * 1000
            yield b'"}}'

        r = c.post("/v1/tasks", content=chunks(), headers={"content-type": "application/json"})
        assert_problem(r, 413)
    assert task_count(live) == 0


def test_validation_error_points_at_field(live: LiveServer) -> None:
    with live.client() as c:
        body = assert_problem(c.post("/v1/tasks", json={"workflow": 1}), 422)
    assert {"pointer": "/workflow"}.items() <= body["errors"][0].items()  # type: ignore[index]


def test_unknown_route_and_method_are_problems(live: LiveServer) -> None:
    with live.client() as c:
        assert_problem(c.get("/v1/nope"), 404)
        assert_problem(c.delete("/v1/tasks"), 405)
        assert_problem(c.get("/v1/tasks/tsk_missing"), 404)


# -- auth ------------------------------------------------------------------------------------------


def _v1_routes(live: LiveServer) -> list[tuple[str, str]]:
    spec = httpx.get(live.url + "/openapi.json").json()
    return [(m.upper(), p) for p, item in spec["paths"].items() if p.startswith("/v1") for m in item]


def test_auth_matrix(live: LiveServer) -> None:
    routes = _v1_routes(live)
    assert len(routes) >= 5
    with live.client() as c:
        tid = c.post("/v1/tasks", json=DIAG).json()["id"]
    other = live.new_key("globex", "tasks:read,tasks:write,tasks:approve")
    readonly = live.new_key("acme", "tasks:read")
    writeonly = live.new_key("acme", "tasks:write")
    for method, path in routes:
        url = live.url + path.replace("{task_id}", tid)
        body = json.dumps(DIAG) if method == "POST" else None
        if path.endswith("/approvals/{call_id}"):
            body = json.dumps({"decision": "approve"})
        cases = {
            "no key": ({}, {401}),
            "bad key": ({"Authorization": "Bearer keel_0000_nope"}, {401}),
            "not bearer": ({"Authorization": f"Basic {live.key}"}, {401}),
        }
        if "{task_id}" in path:
            cases["other tenant"] = ({"Authorization": f"Bearer {other}"}, {404})
        needed = "tasks:write" if method in ("POST", "DELETE") else "tasks:read"
        if path == "/v1/memory/search":
            needed = "tasks:read"  # a read, with its query in a body
        if path.endswith("/approvals/{call_id}"):
            needed = "tasks:approve"
        wrong = writeonly if needed == "tasks:read" else readonly
        cases["missing scope"] = ({"Authorization": f"Bearer {wrong}"}, {403})
        for name, (headers, expected) in cases.items():
            r = httpx.request(method, url, headers={"content-type": "application/json", **headers}, content=body)
            assert r.status_code in expected, f"{method} {path} with {name}: {r.status_code}"
            assert_problem(r, r.status_code)
    assert httpx.get(live.url + "/healthz").status_code == 200
    assert httpx.get(live.url + "/readyz").status_code == 200


# -- idempotency -----------------------------------------------------------------------------------


def test_idempotency_rules(live: LiveServer) -> None:
    with live.client() as c:
        a = c.post("/v1/tasks", json=DIAG, headers={"Idempotency-Key": "k1"})
        b = c.post("/v1/tasks", json=DIAG, headers={"Idempotency-Key": "k1"})
        assert a.status_code == b.status_code == 202
        assert a.json()["id"] == b.json()["id"]
        assert "idempotent-replayed" not in a.headers and b.headers["idempotent-replayed"] == "true"
        changed = {**DIAG, "metadata": {"x": 1}}
        assert_problem(c.post("/v1/tasks", json=changed, headers={"Idempotency-Key": "k1"}), 422)
    with live.client(live.new_key("globex")) as other:
        assert other.post("/v1/tasks", json=changed, headers={"Idempotency-Key": "k1"}).status_code == 202


def test_fifty_concurrent_identical_posts_make_one_task(live: LiveServer) -> None:
    async def burst() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {live.key}", "Idempotency-Key": "burst"}
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/tasks", json=DIAG) for _ in range(50)))

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} <= {202, 409}
    ids = {r.json()["id"] for r in responses if r.status_code == 202}
    assert len(ids) == 1
    for r in responses:
        if r.status_code == 409:
            assert_problem(r, 409)
    assert task_count(live) == 1


@pytest.mark.slow
def test_idempotency_state_machine(live: LiveServer) -> None:
    client = live.client()

    class Idempotency(RuleBasedStateMachine):
        keys = Bundle("keys")

        @initialize()
        def setup(self) -> None:
            self.seen: dict[str, tuple[str, str]] = {}  # key -> (body fingerprint, task id)
            self.prefix = f"m{time.monotonic_ns()}-"

        @rule(target=keys, key=st.text("abcdef", min_size=1, max_size=4))
        def new_key(self, key: str) -> str:
            return self.prefix + key

        @rule(key=keys, steps=st.integers(1, 3), note=st.sampled_from(["a", "b"]))
        def post(self, key: str, steps: int, note: str) -> None:
            body = {"workflow": "diagnostic", "input": {"steps": steps, "step_seconds": 0}, "metadata": {"n": note}}
            fingerprint = json.dumps(body, sort_keys=True)
            r = client.post("/v1/tasks", json=body, headers={"Idempotency-Key": key})
            if key not in self.seen:
                assert r.status_code == 202 and "idempotent-replayed" not in r.headers
                self.seen[key] = (fingerprint, r.json()["id"])
            elif self.seen[key][0] == fingerprint:
                assert r.status_code == 202 and r.headers["idempotent-replayed"] == "true"
                assert r.json()["id"] == self.seen[key][1]
            else:
                assert_problem(r, 422)

        @rule()
        def post_without_key_always_creates(self) -> None:
            a = client.post("/v1/tasks", json=DIAG)
            b = client.post("/v1/tasks", json=DIAG)
            assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]

    Idempotency.TestCase.settings = settings(
        max_examples=15, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
    )
    try:
        Idempotency.TestCase().runTest()
    finally:
        client.close()


def test_openapi_is_31_with_examples(live: LiveServer) -> None:
    spec = httpx.get(live.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    schemas = spec["components"]["schemas"]
    assert schemas["SubmitTask"]["examples"] and schemas["Envelope"]["examples"]
    post = spec["paths"]["/v1/tasks"]["post"]
    assert {"202", "401", "409", "413", "422"} <= set(post["responses"])


def test_workflows_are_listed_with_their_input_schemas(live: LiveServer) -> None:
    with live.client() as c:
        r = c.get("/v1/workflows")
        openapi = c.get("/openapi.json").json()
    assert r.status_code == 200
    by_name = {w["name"]: w for w in r.json()}
    assert {"document_analysis", "diagnostic", "ask", "agent", "reason", "function_call"} <= set(by_name)
    schema = by_name["document_analysis"]["input_schema"]
    assert schema["required"] == ["documents"] and schema["examples"]
    assert "/v1/workflows" in openapi["paths"]
    assert openapi["components"]["schemas"]["SubmitTask"]["examples"][0]["workflow"] == "document_analysis"
    assert httpx.get(f"{live.url}/v1/workflows").status_code == 401
