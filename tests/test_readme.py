"""Every snippet in README.md is accounted for, and those that can run, run (README.md stays true).

:data:`CHECKS` names each fenced block by a marker it contains, and says what checks it: a test here, the test
elsewhere that already runs it, or why it is not run. A new block without an entry fails
:func:`test_every_snippet_is_accounted_for`. curl blocks run in bash against a live server, as printed, but for
the address (``localhost:8000`` → the test server), the key (``$KEEL_API_KEY``), the placeholders (``tsk_…``: the
task the block created; ``https://example.com``: a loopback server handing out a PDF) and, where the machine lacks
them, ``uuidgen`` and ``jq`` (shims on ``PATH``)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from conftest import LiveServer
from keel.client import Envelope as ClientEnvelope
from keel.client import KeelClient, TaskStatus
from keel.memory.types import NewTask
from keel.memory.types import TaskStatus as StoreTaskStatus
from keel.orchestration.engine.envelope import Envelope
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry
from keel.orchestration.tools import Reconciled, Tool, ToolContext
from keel.settings import Settings
from keel.testing.analyst import ScriptedAnalyst
from keel.testing.fake_llm import FakeOpenAIServer
from keel.testing.inmemory import InMemoryStore
from keel.testing.pdfs import make_pdf
from pdf_site import PdfSite

README = Path(__file__).resolve().parents[1] / "README.md"
REQUEST = "Analyse these PDFs, compare insights, and tell me the risks."
CONTRACTS = {
    "vendor-a.pdf": "MASTER SERVICES AGREEMENT - VENDOR A\nPayment is due within 30 days of the invoice date.\n"
    "Liability is capped at the fees paid in the preceding twelve months.",
    "vendor-b.pdf": "SUPPLY AGREEMENT - VENDOR B\nInvoices are payable within 60 days.\n"
    "Vendor B's liability is unlimited for data breaches.",
}
C_PDF = make_pdf(["HOSTING AGREEMENT - VENDOR C\nPayment is due within 45 days.\nService credits are the sole remedy."])

CLI = "not run here: keel CLI lines; every `keel submit` line in the README runs in tests/test_cli.py"
CHECKS: dict[str, str] = {
    # marker (a string only that block contains) → what checks it
    "make demo": "not run: the two commands that open the README set up .venv and run the whole suite",
    "pip install keel-runtime": "tests/test_package.py (the wheel of this tree, in a clean venv, then both commands)",
    "jq -r .id": "test_flagship_over_http",
    "def analyse(paths": "test_flagship_from_python",
    '{"status": "partial_success"': "test_envelope_example_is_the_wire_shape",
    "KEEL_DEFAULT_MODEL=openai:": "not run: `keel serve` against paid providers with real keys (the adapters' "
    "tests use loopback fakes)",
    "keys create": CLI,
    "curl -i -X POST": "test_tasks_over_http",
    "from keel.client import KeelClient, NotFound": "test_tasks_from_python",
    "@workflow(estimate=": "test_readme_workflow_example_runs (it needs a registry and an engine around it)",
    "@tool(effect=": "test_tool_example (run with the names it assumes: ChargeArgs, lookup_charge, http)",
    "streamable_http_client": "test_mcp_example",
    "documents add": CLI,
    "keel eval evals/flagship.yaml": "not run: against a paid provider; `keel eval` runs on scripted models in "
    "tests/orchestration/llm/test_evaluation.py, and on the embedded one in `make eval`",
    "KEEL_STORE_URL=postgresql": "not run: needs Postgres, Redis and Temporal; tests/scaleout.py and the crash "
    "test run that configuration",
}


@dataclass(frozen=True, slots=True)
class Snippet:
    lang: str
    code: str
    line: int


def snippets() -> list[Snippet]:
    text = README.read_text()
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        found.append(Snippet(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return found


def snippet(marker: str) -> str:
    (only,) = [s.code for s in snippets() if marker in s.code]
    return only


def test_every_snippet_is_accounted_for() -> None:
    blocks = snippets()
    assert len(blocks) > 10
    for block in blocks:
        markers = [m for m in CHECKS if m in block.code]
        if not block.lang:  # diagrams and trees: nothing to run, and no code hiding in them
            assert not markers and not re.search(r"^\s*(curl|import|from) ", block.code, re.M), block.line
            continue
        assert len(markers) == 1, f"README.md:{block.line}: a {block.lang} block needs one entry in CHECKS"
    for marker in CHECKS:
        assert sum(marker in b.code for b in blocks) == 1, f"CHECKS[{marker!r}] matches no block, or several"
    # What the tests below say they run, they run.
    names = {v.split()[0] for v in CHECKS.values() if v.startswith("test_")}
    assert names <= set(globals()), names - set(globals())
    assert '"steps": 5, "step_seconds": 0.5' in snippet("keys create")  # the CLI block test_cli.py runs


# -- a live server behind a scripted provider ------------------------------------------------------------------


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "sk-test")
    with FakeOpenAIServer() as server:
        server.respond_with(ScriptedAnalyst().http_reply)
        yield server


@pytest.fixture
def settings(settings: Settings, llm: FakeOpenAIServer) -> Settings:
    settings.default_model = f"openai-compatible:{llm.base_url}#analyst-2026-01-01"
    settings.model_prices = {"analyst": {"input": 1.0, "output": 2.0, "context_window": 16_000}}
    settings.embedding_model = "hash:64"
    settings.fetch_allow_hosts = "127.0.0.1"
    return settings


@pytest.fixture
def env(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    """What a reader has exported: ``KEEL_URL`` and ``KEEL_API_KEY``."""
    monkeypatch.setenv("KEEL_URL", live.url)
    monkeypatch.setenv("KEEL_API_KEY", live.key)
    return live


@pytest.fixture
def site() -> Iterator[PdfSite]:
    s = PdfSite(C_PDF)
    try:
        yield s
    finally:
        s.close()


SHIMS = {
    "uuidgen": "import uuid; print(uuid.uuid4())",
    "jq": "import json, sys; assert sys.argv[1:] == ['-r', '.id'], sys.argv; print(json.load(sys.stdin)['id'])",
}


def run_sh(code: str, live: LiveServer, workdir: Path, site: PdfSite | None = None) -> str:
    """The block in bash with ``set -euo pipefail``, its output in a file that a later ``tsk_…`` reads the
    block's own task id from; returns the output."""
    out = workdir / "out.txt"
    code = code.replace("localhost:8000", live.url.removeprefix("http://"))
    code = code.replace("tsk_…", f"$(grep -o 'tsk_[0-9A-Za-z]*' {out} | head -1)")
    if site is not None:
        code = code.replace("https://example.com", site.url)
    bin_dir = workdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, source in SHIMS.items():
        if shutil.which(name) is None:
            shim = bin_dir / name
            shim.write_text(f'#!/bin/sh\nexec python3 -c {json.dumps(source)} "$@"\n')
            shim.chmod(0o755)
    environ = {**os.environ, "KEEL_API_KEY": live.key, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = f"set -euo pipefail\nexec >{out}\n{code}"
    done = subprocess.run(["bash", "-c", script], cwd=workdir, env=environ, capture_output=True, timeout=120)
    text = out.read_text()
    assert done.returncode == 0, (done.returncode, done.stderr.decode(), text)
    return text


# -- the flagship -----------------------------------------------------------------------------------------------


def write_contracts(workdir: Path) -> list[str]:
    paths = []
    for name, text in CONTRACTS.items():
        (workdir / name).write_bytes(make_pdf([text]))
        paths.append(str(workdir / name))
    return paths


def test_flagship_over_http(env: LiveServer, site: PdfSite, tmp_path: Path) -> None:
    write_contracts(tmp_path)
    out = run_sh(snippet("jq -r .id"), env, tmp_path, site)
    accepted = json.loads(out)
    assert accepted["id"].startswith("tsk_") and set(accepted["links"]) == {"self", "events", "cancel"}, out
    with KeelClient() as keel:
        done = keel.wait(accepted["id"], timeout=60)
    assert done.status is TaskStatus.succeeded and done.envelope is not None, done
    assert [i["label"] for i in done.envelope.result["insights"]] == ["D1", "D2", "D3"]  # both uploads and the URL


def test_flagship_from_python(env: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_flagship"}
    exec(compile(snippet("def analyse(paths"), "README.md", "exec"), namespace)
    envelope = namespace["analyse"](write_contracts(tmp_path), REQUEST)
    assert isinstance(envelope, ClientEnvelope) and envelope.status == "success", envelope
    assert len(envelope.result["insights"]) == 2
    printed = capsys.readouterr().out
    assert "… extract" in printed and "skipped" not in printed


def test_flagship_python_reports_a_skipped_upload(
    env: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snippet checks each upload: an encrypted PDF is named, and the envelope says partial success."""
    namespace: dict[str, Any] = {"__name__": "readme_flagship"}
    exec(compile(snippet("def analyse(paths"), "README.md", "exec"), namespace)
    locked = tmp_path / "pricing.pdf"
    locked.write_bytes(make_pdf(["Prices are confidential."], password="s3cret"))
    envelope = namespace["analyse"]([*write_contracts(tmp_path), str(locked)], REQUEST)
    assert envelope.status == "partial_success" and "document_encrypted" in {e.type for e in envelope.errors}
    assert f"skipped {locked} ['document_encrypted']" in capsys.readouterr().out


def test_envelope_example_is_the_wire_shape() -> None:
    example = json.loads(snippet('{"status": "partial_success"'))
    Envelope.model_validate(example)  # the server's model (extra="forbid"): the example has no invented field
    assert ClientEnvelope.model_validate(example).errors[0].type == "document_encrypted"


# -- "Using it" ------------------------------------------------------------------------------------------------


def test_tasks_over_http(env: LiveServer, tmp_path: Path) -> None:
    out = run_sh(snippet("curl -i -X POST"), env, tmp_path)
    head, _, _ = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 202") and re.search(r"(?i)^location: /v1/tasks/tsk_\w+", head, re.M), head
    task_id = re.search(r'"id":"(tsk_\w+)"', out)
    assert task_id is not None, out
    assert out.count(task_id.group(1)) >= 2  # the poll answered for the task the POST created
    assert "event: end" in out and out.count("event: step_completed") == 3, out  # the stream ran to its end


def test_tasks_from_python(env: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(snippet("from keel.client import KeelClient, NotFound"), "README.md", "exec"), {"__name__": "x"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "1 status" and lines[-3].endswith(" end"), lines
    assert lines[-2] == "succeeded success"
    assert lines[-1].startswith("404 urn:keel:problem:not_found "), lines


# -- tools ------------------------------------------------------------------------------------------------------


class ChargeArgs(BaseModel):
    customer: str
    amount_cents: int


async def lookup_charge(key: str, tc: ToolContext) -> Reconciled:
    return Reconciled(applied=None)


async def test_tool_example() -> None:
    seen: list[httpx.Request] = []

    def payments(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"id": "ch_1", **json.loads(request.content)})

    async with httpx.AsyncClient(base_url="https://pay.test", transport=httpx.MockTransport(payments)) as http:
        namespace: dict[str, Any] = {"ChargeArgs": ChargeArgs, "lookup_charge": lookup_charge, "http": http}
        exec(compile(snippet("@tool(effect="), "README.md", "exec"), namespace)
        charge: Tool = namespace["charge"]
        assert (charge.effect, charge.scopes, charge.reconcile) == ("write", {"billing"}, lookup_charge)
        assert charge.description == "Charge a customer." and charge.takes_context
        tc = ToolContext(tool="charge", call_id="c1", task_id="tsk_1", tenant="acme", idempotency_key="k1")
        result = await charge.invoke(ChargeArgs(customer="cus_1", amount_cents=500), tc)
    assert result == {"id": "ch_1", "customer": "cus_1", "amount_cents": 500}
    assert seen[0].url.path == "/charges" and seen[0].headers["idempotency-key"] == "k1"


def test_mcp_example(live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = snippet("streamable_http_client").replace("http://127.0.0.1:8000", live.url)
    namespace: dict[str, Any] = {"__name__": "readme_mcp"}
    exec(compile(code, "README.md", "exec"), namespace)
    asyncio.run(namespace["main"](live.key))
    tools, found = capsys.readouterr().out.splitlines()
    assert {"search_memory", "fetch_url", "read_document"} & set(ast.literal_eval(tools))
    assert "confidence" in found, found


# -- the workflow example ---------------------------------------------------------------------------------------


async def test_readme_workflow_example_runs() -> None:
    text = README.read_text()
    section = text[text.index("## Writing a workflow") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    analyse: Workflow[Any] = namespace["analyse"]
    registry = WorkflowRegistry()
    registry.register(analyse)
    store = InMemoryStore()
    engine = EmbeddedEngine(store, registry, poll_s=0.02)
    long_text = " ".join(f"risk{i}" for i in range(3000))  # larger than the example model's window
    created = await store.create_task(
        NewTask(tenant="t", workflow="analyse", input={"texts": ["supplier is late", long_text]}), None, time.time()
    )
    assert created.task is not None
    await engine.start()
    try:
        for _ in range(500):
            task = await store.get_task(created.task.id)
            assert task is not None
            if task.status.terminal:
                break
            await asyncio.sleep(0.01)
    finally:
        await engine.stop()
    assert task.status is StoreTaskStatus.succeeded, task.envelope
    assert task.envelope is not None
    assert task.envelope["result"]["words"] == [3, 3000]
    assert task.envelope["metadata"]["reductions"]["reduce"]["levels"] >= 1
