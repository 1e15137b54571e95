"""Planning (intent to a validated task graph, clarification, parallel execution) and map-reduce that keeps every
model call inside the context window without truncating anything."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from keel.memory.types import Event, NewTask, Task, TaskStatus
from keel.orchestration.engine.context import WorkflowContext
from keel.orchestration.engine.runtime import EmbeddedEngine
from keel.orchestration.engine.workflow import Workflow, WorkflowRegistry, workflow
from keel.orchestration.llm.models import Message
from keel.orchestration.llm.planner import Plan, PlanIssue, check_plan
from keel.orchestration.llm.reduce import split_to_fit
from keel.orchestration.tools import Tool, ToolCatalog
from keel.testing.inmemory import InMemoryStore
from keel.testing.models import AgentInfo, FakeModel, FunctionModel, count_words

TENANT = "t"


class Intent(BaseModel):
    intent: str = "compare the two reports"


class Texts(BaseModel):
    texts: list[str]


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    limit: int = 3


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    left: Any
    right: Any


# -- harness ---------------------------------------------------------------------------------------------------


async def run_workflow(
    wf: Workflow[Any], inp: dict[str, Any], budget: dict[str, Any] | None = None, timeout: float = 15.0
) -> tuple[Task, list[Event]]:
    store = InMemoryStore()
    registry = WorkflowRegistry()
    registry.register(wf)
    engine = EmbeddedEngine(store, registry, poll_s=0.02, lease_s=5)
    created = await store.create_task(
        NewTask(tenant=TENANT, workflow=wf.name, input=inp, budget=budget or {}), None, time.time()
    )
    assert created.task is not None
    task_id = created.task.id
    await engine.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            task = await store.get_task(task_id)
            assert task is not None
            if task.status.terminal:
                break
            assert time.monotonic() < deadline, f"task still {task.status} after {timeout}s"
            await asyncio.sleep(0.01)
    finally:
        await engine.stop()
    return task, await store.read(task_id, 0, limit=10000)


def envelope(task: Task) -> dict[str, Any]:
    assert task.envelope is not None
    return task.envelope


def error_types(task: Task) -> list[str]:
    return [e["type"] for e in envelope(task)["errors"]]


def plan_json(nodes: list[dict[str, Any]], *, confidence: float = 0.9, output: str | None = None, **kw: Any) -> str:
    return json.dumps({"goal": "do it", "confidence": confidence, "nodes": nodes, "output": output, **kw})


def tool_node(id: str, tool: str = "search", args: Any = None, deps: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": id,
        "kind": "tool",
        "tool": tool,
        "args": {"query": id} if args is None else args,
        "depends_on": deps or [],
    }


def planner(catalog: ToolCatalog, model: FunctionModel, **plan_kw: Any) -> Workflow[Any]:
    @workflow(name="planner")
    async def wf(ctx: WorkflowContext, inp: Intent) -> dict[str, Any]:
        plan = await ctx.plan(inp.intent, catalog, model=model, **plan_kw)
        run = await ctx.run_plan(plan, catalog, model=model)
        return {"output": run.output, "outputs": run.outputs, "failed": run.failed}

    return wf


class Tools:
    """A catalog whose tools count their calls and record when they ran."""

    def __init__(self, delay: float = 0.0, fail: set[str] | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.spans: dict[str, tuple[float, float]] = {}
        self.seen: list[Any] = []
        self.delay, self.fail = delay, fail or set()

        async def search(args: Query) -> dict[str, Any]:
            self.calls["search"] += 1
            t0 = time.monotonic()
            await asyncio.sleep(self.delay)
            self.spans[args.query] = (t0, time.monotonic())
            if args.query in self.fail:
                raise ValueError(f"search for {args.query!r} broke")
            return {"query": args.query, "hits": args.limit}

        async def join(args: Pair) -> list[Any]:
            self.calls["join"] += 1
            self.seen.append(args.model_dump())
            return [args.left, args.right]

        self.catalog = ToolCatalog(
            [
                Tool(name="search", description="Search the corpus.", input_model=Query, fn=search),
                Tool(name="join", description="Put two results side by side.", input_model=Pair, fn=join),
            ]
        )


def text_of(messages: list[Message]) -> str:
    return "\n".join(m.content for m in messages)


# -- making a plan: repair, rejection, clarification -------------------------------------------------------------

VALID = plan_json([tool_node("a")], output="a")


async def test_invalid_plan_is_repaired() -> None:
    tools = Tools()
    model = FakeModel(["this is not JSON {", VALID])
    task, events = await run_workflow(planner(tools.catalog, model), {})
    assert task.status is TaskStatus.succeeded
    assert envelope(task)["result"]["output"] == {"query": "a", "hits": 3}
    assert len(model.calls) == 2 and tools.calls["search"] == 1
    kinds = [e.type for e in events if e.type in ("plan_rejected", "plan")]
    assert kinds == ["plan_rejected", "plan"]
    [rejected] = [e.data for e in events if e.type == "plan_rejected"]
    assert rejected["attempt"] == 1 and rejected["issues"]
    [accepted] = [e.data for e in events if e.type == "plan"]
    assert accepted["attempts"] == 2 and accepted["plan"] == Plan.model_validate_json(VALID).model_dump(mode="json")
    # the repair request shows the model its own answer and what was wrong with it
    second = model.calls[1]
    assert second[-2] == Message(role="assistant", content="this is not JSON {")
    assert second[-1].role == "user" and "That plan is invalid" in second[-1].content
    assert envelope(task)["metadata"]["plan"] == accepted["plan"]


CYCLE = plan_json(
    [tool_node("a", deps=["b"]), tool_node("b", deps=["a"])],
    output="b",
)


@pytest.mark.parametrize(
    ("reply", "pointer"),
    [
        (plan_json([tool_node("a", tool="teleport")]), "/nodes/0/tool"),
        (CYCLE, "dependency cycle"),
        (plan_json([tool_node("a", args={"query": 5, "limit": "x"})]), "/nodes/0/args/query"),
        ("[]", "object"),
    ],
    ids=["unknown-tool", "cycle", "bad-args", "not-an-object"],
)
@pytest.mark.parametrize("max_repairs", [2, 0])
async def test_always_invalid_plan_fails(reply: str, pointer: str, max_repairs: int) -> None:
    tools = Tools()
    model = FakeModel([reply])
    task, events = await run_workflow(planner(tools.catalog, model, max_repairs=max_repairs), {})
    assert task.status is TaskStatus.failed
    assert len(model.calls) == max_repairs + 1
    [error] = envelope(task)["errors"]
    assert error["type"] == "invalid_plan" and error["step"] == "plan" and error["recovery_suggested"] is True
    assert f"after {max_repairs + 1} attempt(s)" in error["message"] and pointer in error["message"]
    assert [e.data["attempt"] for e in events if e.type == "plan_rejected"] == list(range(1, max_repairs + 2))
    assert not any(e.type == "plan" for e in events)
    assert sum(tools.calls.values()) == 0
    assert [s["kind"] for s in envelope(task)["metadata"]["steps"]] == ["model"] * (max_repairs + 1)


async def test_unsure_plan_asks_for_clarification_and_runs_nothing() -> None:
    tools = Tools()
    model = FakeModel([plan_json([tool_node("a"), tool_node("b")], confidence=0.3)])
    task, events = await run_workflow(planner(tools.catalog, model), {"intent": "do the thing"})
    assert task.status is TaskStatus.needs_clarification
    env = envelope(task)
    assert env["status"] == "needs_clarification"
    assert env["result"]["confidence"] == 0.3
    assert env["result"]["questions"] and all(isinstance(q, str) and q for q in env["result"]["questions"])
    assert sum(tools.calls.values()) == 0
    assert [s["kind"] for s in env["metadata"]["steps"]] == ["model"]  # the planner call, and no tool step
    assert env["metadata"]["tools_called"] == []
    [error] = env["errors"]
    assert error["type"] == "needs_clarification" and error["severity"] == "info" and "0.30" in error["message"]
    assert env["metadata"]["plan"]["confidence"] == 0.3
    assert [e.type for e in events if e.type.startswith("plan")] == ["plan"]


async def test_plan_with_questions_asks_them() -> None:
    tools = Tools()
    questions = ["Which quarter?", "Which of the two reports is the baseline?"]
    model = FakeModel([plan_json([tool_node("a")], confidence=0.95, questions=questions)])
    task, _ = await run_workflow(planner(tools.catalog, model), {})
    assert task.status is TaskStatus.needs_clarification
    assert envelope(task)["result"] == {"questions": questions, "confidence": 0.95}
    assert sum(tools.calls.values()) == 0


async def test_min_confidence_is_configurable() -> None:
    tools = Tools()
    model = FakeModel([plan_json([tool_node("a")], confidence=0.3)])
    task, _ = await run_workflow(planner(tools.catalog, model, min_confidence=0.2), {})
    assert task.status is TaskStatus.succeeded and tools.calls["search"] == 1


# -- check_plan ------------------------------------------------------------------------------------------------


def issues_of(nodes: list[dict[str, Any]], **kw: Any) -> list[PlanIssue]:
    return check_plan(Plan.model_validate_json(plan_json(nodes, **kw)), Tools().catalog)


def test_check_plan_accepts_a_valid_graph() -> None:
    nodes = [
        tool_node("a"),
        tool_node("b"),
        tool_node("c", tool="join", args={"left": {"$ref": "a"}, "right": {"$ref": "b"}}, deps=["a", "b"]),
        {"id": "d", "kind": "model", "prompt": "Summarise.", "depends_on": ["c"]},
    ]
    assert issues_of(nodes, output="d") == []


def test_check_plan_duplicate_ids() -> None:
    issues = issues_of([tool_node("a"), tool_node("a")])
    assert [(i.pointer, i.message) for i in issues] == [
        ("/nodes/0/id", "duplicate node id 'a'"),
        ("/nodes/1/id", "duplicate node id 'a'"),
    ]


def test_check_plan_unknown_and_self_dependencies() -> None:
    issues = issues_of([tool_node("a", deps=["ghost"]), tool_node("b", deps=["a", "b"])])
    pointers = {i.pointer: i.message for i in issues}
    assert pointers["/nodes/0/depends_on/0"] == "unknown node 'ghost'"
    assert pointers["/nodes/1/depends_on/1"] == "a node cannot depend on itself"


def test_check_plan_cycle() -> None:
    nodes = [tool_node("a", deps=["c"]), tool_node("b", deps=["a"]), tool_node("c", deps=["b"]), tool_node("d")]
    [issue] = issues_of(nodes)
    assert issue.pointer == "/nodes" and issue.message == "dependency cycle through a, b, c"


def test_check_plan_unknown_tool_names_the_known_ones() -> None:
    [issue] = issues_of([tool_node("a", tool="teleport")])
    assert issue.pointer == "/nodes/0/tool" and "unknown tool 'teleport'" in issue.message
    assert "search" in issue.message and "join" in issue.message
    [missing] = issues_of([{"id": "a", "kind": "tool", "args": {}}])
    assert missing.pointer == "/nodes/0/tool"


def test_check_plan_bad_arguments_point_at_the_field() -> None:
    issues = issues_of([tool_node("a", args={"limit": "lots", "extra": 1})])
    assert sorted(i.pointer for i in issues) == ["/nodes/0/args/extra", "/nodes/0/args/limit", "/nodes/0/args/query"]
    assert str(issues[0]).startswith("/nodes/0/args/")


def test_check_plan_refs_model_prompts_and_output() -> None:
    issues = issues_of(
        [
            tool_node("a"),
            tool_node("b", tool="join", args={"left": {"$ref": "a"}, "right": 1}),
            {"id": "m", "kind": "model"},
        ],
        output="nowhere",
    )
    assert {(i.pointer, i.message) for i in issues} == {
        ("/nodes/1/args", "$ref 'a' must also be in depends_on"),
        ("/nodes/2/prompt", "a model node needs a prompt"),
        ("/output", "unknown node 'nowhere'"),
    }


# -- executing a plan ------------------------------------------------------------------------------------------

DIAMOND = plan_json(
    [
        tool_node("a"),
        tool_node("b"),
        tool_node("c", tool="join", args={"left": {"$ref": "a"}, "right": {"$ref": "b"}}, deps=["a", "b"]),
    ],
    output="c",
)


async def test_independent_nodes_run_concurrently_and_refs_resolve() -> None:
    tools = Tools(delay=0.3)
    model = FakeModel([DIAMOND])
    wall: list[float] = []

    @workflow(name="diamond")
    async def wf(ctx: WorkflowContext, inp: Intent) -> Any:
        plan = await ctx.plan(inp.intent, tools.catalog, model=model)
        t0 = time.perf_counter()
        run = await ctx.run_plan(plan, tools.catalog, model=model)
        wall.append(time.perf_counter() - t0)
        return run.output

    task, _ = await run_workflow(wf, {})
    assert task.status is TaskStatus.succeeded
    a, b = {"query": "a", "hits": 3}, {"query": "b", "hits": 3}
    assert envelope(task)["result"] == [a, b]
    assert tools.seen == [{"left": a, "right": b}]  # the $refs were replaced by the nodes' outputs
    assert wall[0] < 0.55  # a and b (0.3 s each) overlapped
    (a0, a1), (b0, b1) = tools.spans["a"], tools.spans["b"]
    assert max(a0, b0) < min(a1, b1)
    names = [s["name"] for s in envelope(task)["metadata"]["steps"] if s["kind"] == "tool"]
    assert sorted(names[:2]) == ["plan:a", "plan:b"] and names[2] == "plan:c"
    assert sorted(t["tool"] for t in envelope(task)["metadata"]["tools_called"]) == ["join", "search", "search"]


async def test_model_node_gets_its_dependencies() -> None:
    tools = Tools()
    plan = plan_json(
        [tool_node("facts"), {"id": "answer", "kind": "model", "prompt": "Answer briefly.", "depends_on": ["facts"]}]
    )

    def reply(messages: list[Message], info: AgentInfo) -> str:
        if info.output_schema is not None:
            return plan
        return "ANSWER from " + messages[-1].content.replace("\n", " ")

    model = FunctionModel(reply)
    task, _ = await run_workflow(planner(tools.catalog, model), {})
    assert task.status is TaskStatus.succeeded
    output = envelope(task)["result"]["output"]
    assert output.startswith("ANSWER from Answer briefly.")
    assert '[facts] {"query": "facts", "hits": 3}' in output


async def test_failed_node_skips_dependents_and_the_run_is_partial() -> None:
    tools = Tools(fail={"a"})
    plan = plan_json(
        [
            tool_node("a"),
            tool_node("b", tool="join", args={"left": {"$ref": "a"}, "right": 0}, deps=["a"]),
            tool_node("c"),
        ],
        output="c",
    )
    task, _ = await run_workflow(planner(tools.catalog, FakeModel([plan])), {})
    assert task.status is TaskStatus.partial_success
    env = envelope(task)
    assert env["status"] == "partial_success"
    assert env["result"]["output"] == {"query": "c", "hits": 3}
    assert set(env["result"]["failed"]) == {"a", "b"}
    assert [(e["type"], e["step"]) for e in env["errors"]] == [
        ("step_failed", "plan:a"),
        ("dependency_failed", "plan:b"),
    ]
    assert "skipped: dependency 'a' failed" in env["errors"][1]["message"]
    assert tools.calls == Counter({"search": 2})  # a and c; join never ran


async def test_failed_output_node_fails_the_plan() -> None:
    tools = Tools(fail={"b"})
    task, _ = await run_workflow(planner(tools.catalog, FakeModel([DIAMOND])), {})
    assert task.status is TaskStatus.failed
    env = envelope(task)
    assert error_types(task) == ["step_failed", "dependency_failed", "plan_failed"]
    assert env["errors"][-1]["step"] == "plan" and "'c'" in env["errors"][-1]["message"]
    assert env["result"] == {"plan:a": {"query": "a", "hits": 3}}  # what finished is kept, one key per node
    assert tools.calls["join"] == 0


async def test_ref_with_wrong_shape_is_invalid_tool_args_at_run_time() -> None:
    tools = Tools()
    plan = plan_json(
        [tool_node("a"), tool_node("b", args={"query": {"$ref": "a"}}, deps=["a"])],
        output="b",
    )
    task, _ = await run_workflow(planner(tools.catalog, FakeModel([plan])), {})
    assert task.status is TaskStatus.failed
    assert error_types(task) == ["invalid_tool_args", "plan_failed"]
    assert envelope(task)["errors"][0]["message"].startswith("search: /query:")
    assert envelope(task)["errors"][0]["pointer"] == "/query"
    assert tools.calls["search"] == 1


# -- map-reduce ------------------------------------------------------------------------------------------------

WINDOW = 512
_INPUT_WORD = re.compile(r"^w\d+_\d+$")


def summariser() -> tuple[FunctionModel, list[tuple[int, int]]]:
    """A model that 'summarises' by keeping the first 20 input words it was shown, behind a marker. It records
    every call's prompt size and output cap; FunctionModel itself fails any prompt larger than the window."""
    sizes: list[tuple[int, int]] = []

    def reply(messages: list[Message], info: AgentInfo) -> str:
        assert info.settings is not None and info.settings.max_tokens is not None
        sizes.append((sum(count_words(m.content) for m in messages), info.settings.max_tokens))
        words = [w for w in text_of(messages).split() if _INPUT_WORD.match(w)]
        return f"[S{info.call_index}] " + " ".join(words[:20])

    return FunctionModel(reply, context_window=WINDOW), sizes


def reducer(model: FunctionModel) -> Workflow[Any]:
    @workflow(name="digest")
    async def wf(ctx: WorkflowContext, inp: Texts) -> str:
        reduction = await ctx.reduce_to_fit(inp.texts, model, "Summarise the risks.", name="digest")
        return str(reduction.text)

    return wf


def make_text(i: int, words: int) -> str:
    body = [f"w{i}_{j}" for j in range(words)]
    paragraphs = [" ".join(body[k : k + 60]) for k in range(0, words, 60)]
    return "\n\n".join(paragraphs)


def reachable(tree: dict[str, dict[str, Any]], root: str) -> set[str]:
    seen, stack = set(), [root]
    while stack:
        nid = stack.pop()
        if nid not in seen:
            seen.add(nid)
            stack.extend(tree[nid]["children"])
    return seen


async def test_map_reduce_over_five_windows_without_truncation() -> None:
    sizes_in_words = [700, 900, 300, 300, 200, 250]
    texts = [make_text(i, n) for i, n in enumerate(sizes_in_words)]
    assert sum(sizes_in_words) >= 5 * WINDOW and max(sizes_in_words) > WINDOW
    model, sizes = summariser()
    task, events = await run_workflow(reducer(model), {"texts": texts})
    assert task.status is TaskStatus.succeeded, envelope(task)["errors"]
    env = envelope(task)

    # every call fitted the window, its output cap included
    assert sizes and all(prompt + cap <= WINDOW for prompt, cap in sizes)
    # nothing was truncated: every word of every input reached some model call
    shown = set(" ".join(text_of(m) for m in model.calls).split())
    assert {w for t in texts for w in t.split()} <= shown

    red = env["metadata"]["reductions"]["digest"]
    assert red["levels"] >= 1 and red["context_window"] == WINDOW
    assert red["input_tokens"] == sum(sizes_in_words)
    assert red["calls"] == len(model.calls) == len(sizes)
    tree = {n["id"]: n for n in red["tree"]}
    assert len(tree) == len(red["tree"])
    assert {n["kind"] for n in tree.values()} == {"input", "chunk", "combine", "synthesis"}
    inputs = [n for n in red["tree"] if n["kind"] == "input"]
    assert [(n["source"], n["tokens"]) for n in inputs] == list(enumerate(sizes_in_words))
    for node in inputs:
        chunks = [tree[c] for c in node["children"]]
        assert all(c["kind"] == "chunk" and c["source"] == node["source"] for c in chunks)
        if node["tokens"] > WINDOW:
            assert len(chunks) >= 2
        if chunks:
            assert sum(c["tokens"] for c in chunks) == node["tokens"]  # chunking drops no token
    assert all(child in tree for n in tree.values() for child in n["children"])
    [root] = [n for n in tree.values() if n["kind"] == "synthesis"]
    assert root["level"] == red["levels"] + 1
    assert max(n["level"] for n in tree.values() if n["kind"] == "combine") == red["levels"]
    leaves = {nid for nid, n in tree.items() if n["kind"] == "chunk" or (n["kind"] == "input" and not n["children"])}
    under_root = reachable(tree, root["id"])
    assert leaves <= under_root  # every piece of every input feeds the answer
    assert {tree[nid]["source"] for nid in leaves} == set(range(len(texts)))
    assert env["result"].startswith(f"[S{len(model.calls) - 1}] ")
    [ev] = [e.data for e in events if e.type == "reduction"]
    assert ev == {"name": "digest", "levels": red["levels"], "calls": red["calls"], "input_tokens": red["input_tokens"]}
    model_steps = [s["name"] for s in env["metadata"]["steps"]]
    assert model_steps[-1] == "digest/synthesis" and all(n.startswith("digest/L") for n in model_steps[:-1])


@pytest.mark.parametrize("words", [700, 900])
def test_chunks_of_an_input_concatenate_to_it(words: int) -> None:
    text = make_text(7, words)
    pieces = split_to_fit(text, 155, count_words)
    assert len(pieces) >= words // 155
    assert "".join(pieces) == text
    assert all(count_words(p) <= 155 for p in pieces)
    assert sum(count_words(p) for p in pieces) == words


async def test_inputs_that_fit_take_one_synthesis_call() -> None:
    texts = [make_text(i, 30) for i in range(3)]
    model, sizes = summariser()
    task, _ = await run_workflow(reducer(model), {"texts": texts})
    assert task.status is TaskStatus.succeeded
    red = envelope(task)["metadata"]["reductions"]["digest"]
    assert red["levels"] == 0 and red["calls"] == 1 and len(model.calls) == 1
    assert [(n["id"], n["kind"], n["children"]) for n in red["tree"]] == [
        ("in0", "input", []),
        ("in1", "input", []),
        ("in2", "input", []),
        ("synthesis", "synthesis", ["in0", "in1", "in2"]),
    ]
    assert all(t in text_of(model.calls[0]) for t in texts)
    assert [s["name"] for s in envelope(task)["metadata"]["steps"]] == ["digest/synthesis"]


async def test_a_model_that_does_not_condense_is_caught() -> None:
    def echo(messages: list[Message], info: AgentInfo) -> str:
        words = [w for w in text_of(messages).split() if _INPUT_WORD.match(w)]
        return " ".join(words + ["padding"])

    model = FunctionModel(echo, context_window=WINDOW)
    texts = [make_text(i, 300) for i in range(4)]
    task, _ = await run_workflow(reducer(model), {"texts": texts})
    assert task.status is TaskStatus.failed
    [error] = envelope(task)["errors"]
    assert error["type"] == "reduction_not_converging" and error["step"] == "digest"


# -- split_to_fit properties -----------------------------------------------------------------------------------

_text = st.text(alphabet=st.sampled_from(list("ab \n\t")), max_size=300)


@settings(max_examples=300, deadline=None)
@given(text=_text, limit=st.integers(1, 12))
def test_split_to_fit_keeps_every_word_within_the_limit(text: str, limit: int) -> None:
    pieces = split_to_fit(text, limit, count_words)
    assert all(count_words(p) <= limit for p in pieces)
    assert "".join(pieces).split() == text.split()


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab\n ")), max_size=300).filter(lambda t: t[:1] not in (" ", "\n")),
    limit=st.integers(1, 12),
)
def test_split_to_fit_pieces_join_to_the_original_word_aligned(text: str, limit: int) -> None:
    """Texts whose paragraphs start at a word: pieces concatenate back exactly."""
    text = re.sub(r"\n\n+\s*", "\n\n", text)
    pieces = split_to_fit(text, limit, count_words)
    assert "".join(pieces) == text
    assert all(count_words(p) <= limit for p in pieces)


@settings(max_examples=300, deadline=None)
@example(text="  a b c d", limit=1, by_chars=False)
@example(text="x\n\n  y z w", limit=2, by_chars=False)
@given(text=_text, limit=st.integers(1, 12), by_chars=st.booleans())
def test_split_to_fit_pieces_join_to_the_original(text: str, limit: int, by_chars: bool) -> None:
    count = len if by_chars else count_words
    pieces = split_to_fit(text, limit, count)
    assert all(count(p) <= limit for p in pieces)
    assert "".join(pieces) == text
