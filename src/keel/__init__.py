"""keel: a runtime for LLM-native APIs.

What a workflow or tool author needs is importable from here, whichever room of ``keel.orchestration`` it lives in::

    from keel import WorkflowContext, workflow, tool, ToolContext, Reconciled

Loaded on first use, so ``import keel`` (and every ``python -m keel.…``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.orchestration.engine.context import WorkflowContext
    from keel.orchestration.engine.workflow import Workflow, workflow
    from keel.orchestration.tools import Reconciled, ToolContext, tool

__all__ = ["Reconciled", "ToolContext", "Workflow", "WorkflowContext", "__version__", "tool", "workflow"]

__version__ = "0.1.0"
"""The version of keel (distributed as ``keel-runtime``); the wheel's metadata is built from this line."""

_HOMES = {
    "WorkflowContext": "keel.orchestration.engine.context",
    "Workflow": "keel.orchestration.engine.workflow",
    "workflow": "keel.orchestration.engine.workflow",
    "Reconciled": "keel.orchestration.tools",
    "ToolContext": "keel.orchestration.tools",
    "tool": "keel.orchestration.tools",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'keel' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
