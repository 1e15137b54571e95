"""Planning: intent to a task graph, validated before anything runs, then executed with independent nodes in parallel.

The model proposes a :class:`Plan` as JSON. keel validates it against the schema and against the catalog (known
tools, valid arguments, dependencies that exist and form no cycle). An invalid plan goes back to the model with
its problems, a bounded number of times. A valid plan that is unsure (confidence below the threshold) or that asks
questions ends the task as ``needs_clarification`` before any tool runs.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from keel.errors import AwaitingDecision, ClarificationNeeded, StepFailed, ToolArgsInvalid, WorkflowError
from keel.orchestration.llm.models import Message, Model, ModelSettings
from keel.orchestration.tools import ToolCatalog

if TYPE_CHECKING:
    from keel.orchestration.engine.context import WorkflowContext


class PlanNode(BaseModel):
    """One step of the graph: a tool call or a model call, after the nodes it depends on."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$", description="Unique within the plan.")
    kind: Literal["tool", "model"]
    tool: str | None = Field(None, description="For tool nodes: a tool name from the catalog.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description='Tool arguments. A value {"$ref": "<node id>"} is replaced by that node\'s output.',
    )
    prompt: str | None = Field(None, description="For model nodes: the instruction; dependency outputs follow it.")
    depends_on: list[str] = Field(default_factory=list)


class Plan(BaseModel):
    """A task graph proposed by the model."""

    model_config = ConfigDict(extra="forbid")
    goal: str = Field(description="The intent, restated.")
    confidence: float = Field(ge=0, le=1, description="How sure the planner is that it understood the intent.")
    questions: list[str] = Field(default_factory=list, description="What the planner needs to know to proceed.")
    nodes: list[PlanNode] = Field(default_factory=list, max_length=64)
    output: str | None = Field(None, description="The node whose output answers the intent (default: the last).")

    @property
    def output_node(self) -> str | None:
        return self.output or (self.nodes[-1].id if self.nodes else None)


@dataclass(kw_only=True, slots=True, frozen=True)
class PlanIssue:
    pointer: str
    """JSON pointer into the plan."""
    message: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.message}"


@dataclass(kw_only=True, slots=True)
class PlanRun:
    outputs: dict[str, Any]
    output: Any
    failed: dict[str, str] = field(default_factory=dict)


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        if set(value) == {"$ref"} and isinstance(value["$ref"], str):
            return [value["$ref"]]
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _resolve(value: Any, outputs: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$ref"} and isinstance(value["$ref"], str):
            return outputs[value["$ref"]]
        return {k: _resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, outputs) for v in value]
    return value


def check_plan(plan: Plan, catalog: ToolCatalog) -> list[PlanIssue]:
    """Everything the schema cannot say: known tools, valid arguments, real dependencies, no cycles."""
    issues: list[PlanIssue] = []
    ids = [n.id for n in plan.nodes]
    index = {n.id: i for i, n in enumerate(plan.nodes)}
    for i, node in enumerate(plan.nodes):
        at = f"/nodes/{i}"
        if ids.count(node.id) > 1:
            issues.append(PlanIssue(pointer=f"{at}/id", message=f"duplicate node id {node.id!r}"))
        for j, dep in enumerate(node.depends_on):
            if dep not in index:
                issues.append(PlanIssue(pointer=f"{at}/depends_on/{j}", message=f"unknown node {dep!r}"))
            elif dep == node.id:
                issues.append(PlanIssue(pointer=f"{at}/depends_on/{j}", message="a node cannot depend on itself"))
        for ref in _refs(node.args):
            if ref not in node.depends_on:
                issues.append(PlanIssue(pointer=f"{at}/args", message=f"$ref {ref!r} must also be in depends_on"))
        if node.kind == "tool":
            issues.extend(_check_tool_node(node, at, catalog))
        elif not node.prompt:
            issues.append(PlanIssue(pointer=f"{at}/prompt", message="a model node needs a prompt"))
    if plan.output is not None and plan.output not in index:
        issues.append(PlanIssue(pointer="/output", message=f"unknown node {plan.output!r}"))
    cycle = _cycle(plan)
    if cycle:
        issues.append(PlanIssue(pointer="/nodes", message=f"dependency cycle through {', '.join(cycle)}"))
    return issues


def _check_tool_node(node: PlanNode, at: str, catalog: ToolCatalog) -> list[PlanIssue]:
    if not node.tool:
        return [PlanIssue(pointer=f"{at}/tool", message="a tool node needs a tool")]
    tool = catalog.get(node.tool)
    if tool is None:
        known = ", ".join(t.name for t in catalog)
        return [PlanIssue(pointer=f"{at}/tool", message=f"unknown tool {node.tool!r}; known: {known}")]
    if _refs(node.args):
        return []  # arguments fed by other nodes are validated when the node runs
    try:
        tool.validate(node.args)
    except ToolArgsInvalid as exc:
        return [PlanIssue(pointer=f"{at}/args{pointer}", message=message) for pointer, message in exc.issues]
    return []


def _cycle(plan: Plan) -> list[str]:
    known = {n.id for n in plan.nodes}
    indegree = {n.id: 0 for n in plan.nodes}
    for n in plan.nodes:
        indegree[n.id] = len({d for d in n.depends_on if d in known and d != n.id})
    ready = [i for i, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        current = ready.pop()
        seen += 1
        for n in plan.nodes:
            if current in n.depends_on and n.id != current:
                indegree[n.id] -= 1
                if indegree[n.id] == 0:
                    ready.append(n.id)
    return sorted(i for i, d in indegree.items() if d > 0) if seen < len(indegree) else []


PLANNER_PROMPT = """You plan work for an API. Turn the user's request into a task graph.
Answer with one JSON object only, valid against this JSON schema:
{schema}

Tools you may use (name, description, argument schema):
{tools}

Rules: use only these tools; a node runs after every node in its depends_on; pass a node's output to a tool
argument as {{"$ref": "<node id>"}}; end with the node whose output answers the request, named in "output".
Set "confidence" to how sure you are that you understood the request. If the request is ambiguous or lacks
something you need, ask in "questions" instead of guessing."""


async def make_plan(
    ctx: WorkflowContext,
    intent: str,
    catalog: ToolCatalog,
    *,
    model: Model,
    min_confidence: float = 0.6,
    max_repairs: int = 2,
    name: str = "plan",
) -> Plan:
    """Ask ``model`` for a plan, repair it at most ``max_repairs`` times, and gate it on confidence."""
    system = PLANNER_PROMPT.format(
        schema=json.dumps(Plan.model_json_schema()), tools=json.dumps(catalog.describe(), indent=1)
    )
    messages = [Message(role="system", content=system), Message(role="user", content=intent)]
    issues: list[PlanIssue] = []
    plan: Plan | None = None
    attempts = 0
    for attempts in range(1, max_repairs + 2):  # noqa: B007 - attempts is reported below
        text = await ctx.generate(
            f"{name}.draft",
            model,
            messages,
            json_schema=Plan.model_json_schema(),
            settings=ModelSettings(temperature=0.0),
        )
        plan, issues = _parse(text, catalog)
        if not issues:
            break
        await ctx.emit("plan_rejected", {"attempt": attempts, "issues": [str(i) for i in issues]})
        problems = "\n".join(f"- {i}" for i in issues)
        messages += [
            Message(role="assistant", content=text),
            Message(role="user", content=f"That plan is invalid:\n{problems}\nReturn the corrected JSON only."),
        ]
    if issues or plan is None:
        raise WorkflowError(
            f"no valid plan after {attempts} attempt(s): " + "; ".join(str(i) for i in issues[:5]),
            type="invalid_plan",
            step=name,
            recovery_suggested=True,
        )
    dumped = plan.model_dump(mode="json")
    ctx.metadata["plan"] = dumped
    await ctx.emit("plan", {"plan": dumped, "attempts": attempts})
    if plan.questions or plan.confidence < min_confidence or not plan.nodes:
        questions = plan.questions or [
            f"I am not sure what you are asking for (confidence {plan.confidence:.2f}). "
            "Could you say more precisely what you want done, and on which inputs?"
        ]
        raise ClarificationNeeded(
            f"the plan needs clarification before anything runs (confidence {plan.confidence:.2f}, "
            f"threshold {min_confidence:.2f})",
            questions=questions,
            confidence=plan.confidence,
        )
    return plan


def _parse(text: str, catalog: ToolCatalog) -> tuple[Plan | None, list[PlanIssue]]:
    try:
        plan = Plan.model_validate_json(_strip_fences(text))
    except pydantic.ValidationError as exc:
        return None, [
            PlanIssue(pointer="/" + "/".join(str(p) for p in e["loc"]), message=e["msg"]) for e in exc.errors()[:10]
        ]
    return plan, check_plan(plan, catalog)


def _strip_fences(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    return t


async def execute_plan(
    ctx: WorkflowContext,
    plan: Plan,
    catalog: ToolCatalog,
    *,
    model: Model,
    name: str = "plan",
    timeout_per_node: float | None = None,
) -> PlanRun:
    """Run the graph: every node starts as soon as its dependencies are done, so independent nodes run in
    parallel. A failed node fails its dependents (as envelope errors); outputs so far are partial results."""
    ex = _Executor(ctx, plan, catalog, model, name, timeout_per_node)
    try:
        while len(ex.outputs) + len(ex.failed) + len(ex.waiting) < len(ex.nodes):
            settled = len(ex.failed)
            ex.schedule()
            if not ex.running:
                if ex.waiting:
                    break  # what could run has run; the rest waits on a person's decision
                if len(ex.failed) == settled:  # nothing can start and nothing runs: a cycle nobody validated
                    raise WorkflowError("the plan's dependencies form a cycle", type="invalid_plan", step=name)
                continue
            done, _ = await asyncio.wait(ex.running, return_when=asyncio.FIRST_COMPLETED)
            await ex.settle(done)
    finally:
        for t in ex.running:
            t.cancel()
        await asyncio.gather(*ex.running, return_exceptions=True)
    if ex.waiting:
        raise AwaitingDecision([r for w in ex.waiting.values() for r in w.requests])
    out = plan.output_node
    if out is None or out not in ex.outputs:
        raise WorkflowError(
            f"the plan's output node {out!r} did not complete: {ex.failed.get(out or '', 'no output')}",
            type="plan_failed",
            step=name,
        )
    return PlanRun(outputs=ex.outputs, output=ex.outputs[out], failed=ex.failed)


class _Executor:
    def __init__(
        self,
        ctx: WorkflowContext,
        plan: Plan,
        catalog: ToolCatalog,
        model: Model,
        name: str,
        timeout: float | None,
    ) -> None:
        self.ctx, self.catalog, self.model, self.name, self.timeout = ctx, catalog, model, name, timeout
        self.nodes = {n.id: n for n in plan.nodes}
        self.outputs: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        self.waiting: dict[str, AwaitingDecision] = {}
        self.running: dict[asyncio.Task[Any], str] = {}

    def schedule(self) -> None:
        busy = set(self.running.values())
        for nid, node in self.nodes.items():
            if nid in self.outputs or nid in self.failed or nid in self.waiting or nid in busy:
                continue
            broken = [d for d in node.depends_on if d in self.failed]
            if broken:
                self.failed[nid] = f"skipped: dependency {broken[0]!r} failed"
                self.ctx.error("dependency_failed", self.failed[nid], step=f"{self.name}:{nid}")
            elif all(d in self.outputs for d in node.depends_on):
                self.running[asyncio.ensure_future(self.run(node))] = nid

    async def settle(self, done: set[asyncio.Task[Any]]) -> None:
        for t in done:
            nid = self.running.pop(t)
            exc = t.exception()
            if isinstance(exc, AwaitingDecision):
                self.waiting[nid] = exc  # its siblings go on; the run parks once they are done
            elif isinstance(exc, StepFailed):
                self.failed[nid] = exc.message
                self.ctx.error(exc.type, exc.message, step=exc.step, pointer=exc.pointer)
            elif exc is not None:
                raise exc
            else:
                self.outputs[nid] = t.result()
                await self.ctx.partial_result(f"{self.name}:{nid}", self.outputs[nid])

    async def run(self, node: PlanNode) -> Any:
        key = f"{self.name}:{node.id}"
        if node.kind == "tool":
            tool = self.catalog.get(node.tool or "")
            if tool is None:
                raise WorkflowError(f"unknown tool {node.tool!r}", type="invalid_plan", step=key)
            return await self.ctx.tool(tool, _resolve(node.args, self.outputs), name=key, timeout=self.timeout)
        inputs = {d: self.outputs[d] for d in node.depends_on}
        return await _model_node(self.ctx, key, self.model, node.prompt or "", inputs, self.timeout)


async def _model_node(
    ctx: WorkflowContext,
    key: str,
    model: Model,
    prompt: str,
    inputs: dict[str, Any],
    timeout: float | None,
) -> Any:
    texts = [f"[{k}]\n{v if isinstance(v, str) else json.dumps(v, default=str)}" for k, v in inputs.items()]
    material = "\n\n".join(texts)
    if model.count_tokens(prompt + material) + 512 > model.context_window and len(texts) > 0:
        # Too much to say at once: reduce hierarchically instead of truncating.
        reduction = await ctx.reduce_to_fit(texts, model, prompt, name=key)
        return reduction.text
    content = prompt if not material else f"{prompt}\n\nInputs:\n{material}"
    return await ctx.generate(key, model, content, timeout=timeout)
