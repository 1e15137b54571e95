"""Run the flagship ``document_analysis`` in process, on the embedded default (SQLite, MiniLM, a local model), over
documents given as PDF bytes, and time it: what the eval (``eval_local_models.py``) and a quick look at the demo
documents (``python bench/flagship_run.py qwen2.5-1.5b``) have in common.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.app import registry_for, running
from keel.memory.types import NewTask
from keel.settings import Settings

TENANT = "eval"


@dataclass(kw_only=True, slots=True)
class Run:
    envelope: dict[str, Any] | None
    status: str
    wall_s: float
    """From submission to the task's end (ingestion included; the model already loaded)."""
    output_tokens: int
    model_s: float
    """Seconds spent in model calls (their latency, summed)."""
    calls: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.model_s if self.model_s else 0.0


async def analyse(
    model: str,
    documents: list[tuple[str, bytes]],
    request: str,
    *,
    data_dir: Path,
    timeout_s: float = 1800.0,
    **options: Any,
) -> Run:
    """One ``document_analysis`` task over ``documents`` (name, PDF bytes) with ``model`` (a spec such as
    ``local:qwen2.5-1.5b``), in a fresh keel on ``data_dir``."""
    settings = Settings(data_dir=data_dir, default_model=model, embedding_model="local:minilm")
    async with running(settings, registry_for(settings)) as keel:
        ids = []
        for name, data in documents:
            doc = await keel.memory.ingestor.ingest_bytes(TENANT, data, source=f"upload:{name}")
            ids.append(doc.id)
        inp = {"request": request, "documents": ids, **options}
        started = time.perf_counter()
        created = await keel.stores.tasks.create_task(
            NewTask(tenant=TENANT, workflow="document_analysis", input=inp), None, time.time()
        )
        assert created.task is not None
        task_id = created.task.id
        while True:
            task = await keel.stores.tasks.get_task(task_id)
            assert task is not None
            if task.status.terminal:
                break
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"the analysis did not finish in {timeout_s:g} s")
            await asyncio.sleep(0.2)
        wall = time.perf_counter() - started
    envelope = task.envelope
    calls = (envelope or {}).get("metadata", {}).get("model_calls", [])
    return Run(
        envelope=envelope,
        status=task.status.value,
        wall_s=wall,
        output_tokens=sum(int(c.get("output_tokens") or 0) for c in calls),
        model_s=sum(float(c.get("latency_ms") or 0) for c in calls) / 1000,
        calls=len(calls),
    )


def demo_documents() -> list[tuple[str, bytes]]:
    """The four PDFs of ``make demo`` (scripts/sample_documents.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from sample_documents import write_samples

    out = Path(tempfile.mkdtemp(prefix="keel-demo-docs-"))
    return [(p.name, p.read_bytes()) for p in write_samples(out)]


def main(argv: list[str]) -> None:
    model = argv[0] if argv else "qwen2.5-1.5b"
    spec = model if ":" in model else f"local:{model}"
    with tempfile.TemporaryDirectory(prefix="keel-flagship-") as tmp:
        run = asyncio.run(
            analyse(
                spec,
                demo_documents(),
                "Analyse these 4 PDFs, compare insights, and tell me the risks.",
                data_dir=Path(tmp),
            )
        )
    env = run.envelope or {}
    result = env.get("result") or {}
    print(f"{spec}: {run.status} in {run.wall_s:.1f} s, {run.calls} calls, {run.tokens_per_s:.1f} tokens/s")
    for e in env.get("errors", []):
        print(f"  {e['severity']}: {e['type']}: {e['message'][:160]}")
    for row in (result.get("comparison") or {}).get("table", []):
        cells = "; ".join(f"{c['label']}: {c['value'][:50]}" for c in row["cells"])
        print(f"  {row['status']:>7} {row['topic']}: {cells}")
    for risk in result.get("risks") or []:
        print(f"  risk ({risk['severity']}) [{risk['topic']}]: {risk['risk']}\n      {risk['rationale'][:200]}")
    Path("/tmp/flagship-envelope.json").write_text(json.dumps(env, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
