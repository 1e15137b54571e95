"""The README's workflow example runs as printed (README.md stays true)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from keel.memory.types import NewTask, TaskStatus
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry
from keel.testing.inmemory import InMemoryStore

README = Path(__file__).resolve().parents[1] / "README.md"


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
    assert task.status is TaskStatus.succeeded, task.envelope
    assert task.envelope is not None
    assert task.envelope["result"]["words"] == [3, 3000]
    assert task.envelope["metadata"]["reductions"]["reduce"]["levels"] >= 1
