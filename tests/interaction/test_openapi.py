"""The OpenAPI document matches the wire: valid, committed, one problem shape, bearer auth, operation ids, SSE
events and the webhook documented; /docs works offline; and a client generated from it works against keel."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from conftest import LiveServer
from keel.app import create_app
from keel.interaction.openapi import EVENTS, TaskWebhook, render
from keel.memory.types import TaskStatus, webhook_payload
from keel.scopes import SCOPES
from keel.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "openapi.json"
PROBLEM = {"$ref": "#/components/schemas/Problem"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("keel"), default_model="test"))


@pytest.fixture(scope="module")
def spec(app: FastAPI) -> dict[str, Any]:
    return app.openapi()


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_the_committed_document_is_the_apps(app: FastAPI) -> None:
    if not COMMITTED.exists() or COMMITTED.read_text() != render(app):
        pytest.fail("docs/openapi.json differs from the app's document: regenerate it with `python scripts/openapi.py`")


def test_the_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate(spec)
    validate(json.loads(COMMITTED.read_text()))


def test_every_non_2xx_answer_is_a_problem(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in json.dumps(spec)
    checked = 0
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if status[0] not in "45":
                continue
            assert list(response["content"]) == ["application/problem+json"], (method, path, status)
            assert response["content"]["application/problem+json"]["schema"] == PROBLEM, (method, path, status)
            checked += 1
    assert checked > 50
    problem = spec["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "instance", "errors"} <= set(problem["properties"])
    assert problem["additionalProperties"] is True  # keel's extension members
    error = spec["components"]["schemas"]["ProblemError"]
    assert set(error["required"]) == {"pointer", "message"}


def test_every_v1_operation_names_the_bearer_scheme_and_its_scope(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["bearerAuth"] | {"description": ""} == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "keel API key",
        "description": "",
    }
    scopes: dict[str, str] = {}
    for method, path, operation in operations(spec):
        if not path.startswith("/v1/") and path != "/metrics":
            assert "security" not in operation, path
            continue
        [requirement] = operation["security"]
        [(scheme, [scope])] = requirement.items()
        assert scheme == "bearerAuth" and scope in SCOPES, (method, path)
        assert {"401", "403"} <= set(operation["responses"]), (method, path)
        scopes[f"{method} {path}"] = scope
    assert scopes["post /v1/tasks"] == "tasks:write" and scopes["get /v1/tasks/{task_id}"] == "tasks:read"
    assert scopes["post /v1/tasks/{task_id}/approvals/{call_id}"] == "tasks:approve"
    assert scopes["get /v1/models/stats"] == "operator" and scopes["put /v1/tenants/{tenant}/limits"] == "operator"
    assert scopes["get /v1/tenants/{tenant}/limits"] == "admin" and scopes["post /v1/keys"] == "admin"
    assert scopes["get /metrics"] == "metrics"
    assert "429" in spec["paths"]["/metrics"]["get"]["responses"]  # a scrape spends the tenant's request rate


def test_operation_ids_are_unique_method_names(spec: dict[str, Any]) -> None:
    ids = {f"{method} {path}": op["operationId"] for method, path, op in operations(spec)}
    assert len(set(ids.values())) == len(ids)
    assert all(re.fullmatch(r"[a-z][A-Za-z0-9]*", i) for i in ids.values()), ids
    assert {
        "post /v1/tasks": "submitTask",
        "get /v1/tasks": "listTasks",
        "get /v1/tasks/{task_id}": "getTask",
        "post /v1/tasks/{task_id}/cancel": "cancelTask",
        "get /v1/tasks/{task_id}/events": "streamTaskEvents",
        "post /v1/tasks/{task_id}/approvals/{call_id}": "decideApproval",
        "post /v1/documents": "ingestDocument",
        "post /v1/chat": "chat",
        "post /v1/stream": "streamAnswer",
    }.items() <= ids.items()


def test_the_main_request_bodies_carry_examples(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["SubmitTask"]["examples"] and schemas["DecisionBody"]["examples"]
    for path in ("/v1/chat", "/v1/agent", "/v1/reason", "/v1/function-call", "/v1/stream"):
        assert spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"], path


def test_each_stream_documents_its_events(spec: dict[str, Any]) -> None:
    streams = [
        ("get", "/v1/tasks/{task_id}/events"),
        ("post", "/v1/stream"),
        ("post", "/v1/chat"),
    ]
    schemas = spec["components"]["schemas"]
    for method, path in streams:
        media = spec["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]
        assert media["schema"]["type"] == "string" and "`end`" in media["schema"]["description"]
        frames = media["x-itemSchema"]["oneOf"]
        names = {f["properties"]["event"].get("const") for f in frames}
        assert names == {*EVENTS, None}, path  # None: any other event name
        for frame in frames:
            ref = frame["properties"]["data"]["$ref"].rsplit("/", 1)[1]
            assert ref in schemas, (path, ref)
        assert "event: " in media["example"], path
    assert spec["paths"]["/v1/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"].keys() == {
        "text/event-stream"
    }


def test_the_webhook_is_documented_as_keel_sends_it(spec: dict[str, Any]) -> None:
    hook = spec["webhooks"]["task"]["post"]
    assert hook["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/TaskWebhook"}
    headers = {p["name"] for p in hook["parameters"] if p["in"] == "header"}
    assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    envelope = {"status": "success", "result": {"ok": True}, "errors": [], "metadata": {}}
    sent = [s for s in TaskStatus if s.terminal or s is TaskStatus.waiting_for_approval]
    for status in sent:  # the payload keel builds validates against the documented model
        TaskWebhook.model_validate(webhook_payload("tsk_1", status, envelope, 1_800_000_000.0))


def problem_validator(spec: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**PROBLEM, "components": spec["components"]})


def test_problem_bodies_on_the_wire_match_the_schema(live: LiveServer, spec: dict[str, Any]) -> None:
    check = problem_validator(spec)
    with live.client() as c, httpx.Client(base_url=live.url, timeout=30) as anonymous:
        reader = live.new_key("acme", "tasks:read")
        answers = {
            "no key": anonymous.get("/v1/tasks"),
            "not bearer": anonymous.get("/v1/tasks", headers={"Authorization": "Basic dXNlcjpwdw=="}),
            "unknown key": anonymous.get("/v1/tasks", headers={"Authorization": "Bearer keel_nope"}),
            "scope": c.post(
                "/v1/tasks", json={"workflow": "diagnostic"}, headers={"Authorization": f"Bearer {reader}"}
            ),
            "missing": c.get("/v1/tasks/tsk_missing"),
            "body": c.post("/v1/tasks", json={"input": {}}),
            "query": c.get("/v1/tasks", params={"limit": 0}),
            "workflow input": c.post("/v1/tasks", json={"workflow": "diagnostic", "input": {"steps": "many"}}),
            "unknown workflow": c.post("/v1/tasks", json={"workflow": "nope"}),
            "malformed": c.post("/v1/tasks", content=b"{", headers={"content-type": "application/json"}),
        }
    for name, r in answers.items():
        assert r.headers["content-type"].startswith("application/problem+json"), name
        errors = sorted(check.iter_errors(r.json()), key=str)
        assert not errors, (name, r.json(), errors)
    bodies = {name: r.json() for name, r in answers.items()}
    # Today's 401/403 messages, kept through the bearer scheme.
    assert [bodies[n]["detail"] for n in ("no key", "not bearer", "unknown key")] == [
        "missing bearer API key",
        "missing bearer API key",
        "invalid API key",
    ]
    assert answers["no key"].headers["www-authenticate"] == "Bearer"
    assert bodies["scope"]["status"] == 403 and "tasks:write" in bodies["scope"]["detail"]
    # One validation shape, whichever layer refused the request.
    for name in ("body", "query", "workflow input"):
        assert bodies[name]["type"] == "urn:keel:problem:validation_error" and bodies[name]["errors"], name
    assert [e["pointer"] for e in bodies["workflow input"]["errors"]] == ["/input/steps"]
    assert [e["pointer"] for e in bodies["query"]["errors"]] == ["/query/limit"]
    assert bodies["unknown workflow"]["known"]  # extension members at the top level, never under `context`
    assert not any("context" in b for b in bodies.values())


def test_docs_and_redoc_load_nothing_from_a_cdn(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for page in ("/docs", "/redoc"):
            html = c.get(page)
            assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
            assert "http://" not in html.text and "https://" not in html.text, page
            assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
            assert assets, page
            for asset in assets:
                r = c.get(asset)
                assert r.status_code == 200 and len(r.content) > 1000, (page, asset)
        assert "SwaggerUIBundle" in c.get("/docs/assets/swagger-ui-bundle.js").text
        assert c.get("/docs/oauth2-redirect").status_code == 200


# -- a generated client ---------------------------------------------------------------------------------------------


@pytest.fixture
def generated(live: LiveServer, tmp_path: Path) -> Iterator[ModuleType]:
    """``openapi-python-client`` run on the live server's document, as a user would, and its package imported."""
    document = tmp_path / "openapi.json"
    document.write_text(httpx.get(f"{live.url}/openapi.json", timeout=30).text)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"post_hooks": []}))  # no formatter run: the code is imported, not read
    out = tmp_path / "client"
    generator = Path(sys.executable).parent / "openapi-python-client"
    done = subprocess.run(
        [str(generator), "generate", "--path", str(document), "--output-path", str(out), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("keel_client")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == "keel_client" or m.startswith("keel_client.")]:
            del sys.modules[name]


def test_a_generated_client_submits_polls_and_gets_a_typed_problem(live: LiveServer, generated: ModuleType) -> None:
    models = importlib.import_module("keel_client.models")
    submit_task = importlib.import_module("keel_client.api.tasks.submit_task")
    get_task = importlib.import_module("keel_client.api.tasks.get_task")

    body = models.SubmitTask.from_dict({"workflow": "diagnostic", "input": {"steps": 2, "step_seconds": 0}})
    assert body.to_dict()["input"] == {"steps": 2, "step_seconds": 0}  # the wire name, whatever Python calls it
    with (
        generated.AuthenticatedClient(base_url=live.url, token=live.key) as client,
        generated.Client(base_url=live.url) as anonymous,
    ):
        accepted = submit_task.sync(client=client, body=body, idempotency_key="generated-1")
        assert isinstance(accepted, models.TaskAccepted) and accepted.id.startswith("tsk_")
        assert accepted.links.self_ == f"/v1/tasks/{accepted.id}"

        deadline = time.monotonic() + 30
        task = get_task.sync(accepted.id, client=client)
        while isinstance(task, models.TaskView) and task.status.value in ("queued", "running"):
            assert time.monotonic() < deadline, task
            time.sleep(0.05)
            task = get_task.sync(accepted.id, client=client)
        assert isinstance(task, models.TaskView) and task.status == models.TaskStatus.SUCCEEDED
        assert task.envelope.status == models.EnvelopeStatus.SUCCESS

        missing = get_task.sync_detailed("tsk_missing", client=client)
        refused = get_task.sync_detailed(accepted.id, client=anonymous)
    assert missing.status_code == 404 and isinstance(missing.parsed, models.Problem)
    problem = missing.parsed
    assert problem.type_ == "urn:keel:problem:not_found" and problem.status == 404 and problem.title == "Not Found"
    assert refused.status_code == 401 and isinstance(refused.parsed, models.Problem)
    assert refused.parsed.detail == "missing bearer API key"
