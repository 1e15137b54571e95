"""The built-in workflows, above the engine: each is a :class:`~keel.orchestration.engine.workflow.Workflow`
that the engine runs like any user's. The engine never imports this package; the app registers it."""

from __future__ import annotations

from keel.orchestration.engine.workflow import WorkflowRegistry
from keel.orchestration.workflows.basic import ASK, DIAGNOSTIC, TOOL_CALL
from keel.orchestration.workflows.document_analysis import DOCUMENT_ANALYSIS
from keel.orchestration.workflows.endpoints import AGENT, FUNCTION_CALL, REASON
from keel.orchestration.workflows.memory import INGEST, MEMORY_REINDEX
from keel.orchestration.workflows.respond import RESPOND

BUILTIN = (DIAGNOSTIC, ASK, TOOL_CALL, INGEST, MEMORY_REINDEX, DOCUMENT_ANALYSIS, AGENT, REASON, FUNCTION_CALL, RESPOND)


def default_registry() -> WorkflowRegistry:
    """A registry holding every built-in workflow."""
    registry = WorkflowRegistry()
    for wf in BUILTIN:
        registry.register(wf)
    return registry
