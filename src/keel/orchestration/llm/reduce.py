"""Map-reduce that keeps every model call inside the context window and never truncates.

Inputs are measured in the model's tokens. When they fit, one call answers. When they do not, each input too large
for half a call is split into chunks (every token lands in exactly one chunk), neighbours are combined in pairs,
level by level, until what is left fits one final synthesis call. Every node of that tree, with its token count and
children, is recorded in the envelope's metadata, so a reader can see how the answer was reached.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from keel.errors import ConfigError, StepFailed, WorkflowError
from keel.orchestration.llm.models import Model, ModelSettings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keel.orchestration.engine.context import WorkflowContext

COMBINE = """{instruction}

You are combining partial notes taken from a larger set of documents, because the whole does not fit at once.
Keep every fact, figure, name and risk that matters for the task above; drop repetition. Stay under {limit} words.

{material}"""

SYNTHESIS = """{instruction}

The material below covers all of the input, some of it already condensed from the original documents.

{material}"""


@dataclass(kw_only=True, slots=True)
class ReduceNode:
    id: str
    kind: str
    """``input``, ``chunk`` (a piece of an input too large for one call), ``combine`` or ``synthesis``."""
    level: int
    tokens: int
    children: list[str] = field(default_factory=list)
    source: int | None = None
    """For inputs and chunks: the index of the input text."""


@dataclass(kw_only=True, slots=True)
class Reduction:
    text: str
    tree: list[ReduceNode]
    levels: int
    calls: int
    input_tokens: int
    context_window: int

    def as_metadata(self) -> dict[str, Any]:
        return {
            "context_window": self.context_window,
            "input_tokens": self.input_tokens,
            "levels": self.levels,
            "calls": self.calls,
            "tree": [asdict(n) for n in self.tree],
        }


_UNITS = re.compile(r"\s*\S+\s*")


def split_to_fit(text: str, limit: int, count: Any) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` tokens each, at paragraph, then word, boundaries.
    Concatenated, the pieces are exactly ``text``: nothing is dropped."""
    if count(text) <= limit:
        return [text]
    paragraphs = re.split(r"(?<=\n\n)", text)
    units: list[str] = []
    for para in paragraphs:
        if count(para) <= limit:
            units.append(para)
        else:
            units.extend(m.group(0) for m in _UNITS.finditer(para)) if para.strip() else units.append(para)
    pieces: list[str] = []
    current, current_tokens = "", 0
    for unit in units:
        n = count(unit)
        if n > limit:  # one "word" longer than a whole piece: cut it by characters, still losing nothing
            if current:
                pieces.append(current)
                current, current_tokens = "", 0
            step = max(1, len(unit) * limit // max(n, 1))
            pieces.extend(unit[i : i + step] for i in range(0, len(unit), step))
            continue
        if current and current_tokens + n > limit:
            pieces.append(current)
            current, current_tokens = "", 0
        current += unit
        current_tokens += n
    if current:
        pieces.append(current)
    out: list[str] = []
    for piece in pieces:  # unit counts are not exactly additive; re-check and halve what still overflows
        out.extend([piece] if count(piece) <= limit or len(piece) < 2 else split_to_fit(piece, max(limit, 1), count))
    return out


async def reduce_to_fit(
    ctx: WorkflowContext,
    texts: Sequence[str],
    model: Model,
    instruction: str,
    *,
    name: str = "reduce",
    output_tokens: int | None = None,
    prompt_overhead: int = 96,
) -> Reduction:
    """Answer ``instruction`` over ``texts`` with calls that each fit ``model.context_window``."""
    window = model.context_window
    out_cap = output_tokens or max(64, window // 8)
    room = window - out_cap - model.count_tokens(COMBINE.format(instruction=instruction, limit=0, material=""))
    room -= prompt_overhead
    half = room // 2
    if half < out_cap + 16:
        raise ConfigError(
            f"context window {window} is too small to reduce with {out_cap}-token outputs and this instruction"
        )
    tree: list[ReduceNode] = []
    level_nodes: list[tuple[ReduceNode, str]] = []
    for i, text in enumerate(texts):
        node = ReduceNode(id=f"in{i}", kind="input", level=0, tokens=model.count_tokens(text), source=i)
        tree.append(node)
        pieces = split_to_fit(text, half, model.count_tokens)
        if len(pieces) == 1:
            level_nodes.append((node, text))
            continue
        for j, piece in enumerate(pieces):
            chunk = ReduceNode(
                id=f"in{i}.{j}", kind="chunk", level=0, tokens=model.count_tokens(piece), source=i, children=[]
            )
            node.children.append(chunk.id)
            tree.append(chunk)
            level_nodes.append((chunk, piece))
    input_tokens = sum(n.tokens for n in tree if n.kind == "input")
    settings = ModelSettings(max_tokens=out_cap, temperature=0.0)
    level, calls = 0, 0
    while sum(n.tokens for n, _ in level_nodes) > room and len(level_nodes) > 1:
        level += 1
        before = sum(n.tokens for n, _ in level_nodes)
        pairs = [level_nodes[i : i + 2] for i in range(0, len(level_nodes), 2)]
        jobs = []
        for j, pair in enumerate(pairs):
            if len(pair) == 1:
                continue  # an odd one out goes up a level unchanged
            material = "\n\n---\n\n".join(text for _, text in pair)
            prompt = COMBINE.format(instruction=instruction, limit=int(out_cap * 0.7), material=material)
            _check_fits(model, prompt, out_cap, f"{name}/L{level}/{j}")
            jobs.append((j, ctx.generate(f"{name}/L{level}/{j}", model, prompt, settings=settings)))
        summaries = await _all(ctx, [job for _, job in jobs])
        calls += len(jobs)
        by_pair = dict(zip([j for j, _ in jobs], summaries, strict=True))
        next_nodes: list[tuple[ReduceNode, str]] = []
        for j, pair in enumerate(pairs):
            if len(pair) == 1:
                next_nodes.append(pair[0])
                continue
            text = by_pair[j]
            node = ReduceNode(
                id=f"L{level}.{j}",
                kind="combine",
                level=level,
                tokens=model.count_tokens(text),
                children=[n.id for n, _ in pair],
            )
            tree.append(node)
            next_nodes.append((node, text))
        level_nodes = next_nodes
        if sum(n.tokens for n, _ in level_nodes) >= before:
            raise WorkflowError(
                f"reduction is not converging at level {level}: the model's summaries are not shorter than their "
                "inputs",
                type="reduction_not_converging",
                step=name,
            )
    material = "\n\n---\n\n".join(text for _, text in level_nodes)
    prompt = SYNTHESIS.format(instruction=instruction, material=material)
    _check_fits(model, prompt, out_cap, f"{name}/synthesis")
    answer: str = await ctx.generate(f"{name}/synthesis", model, prompt, settings=settings)
    calls += 1
    final = ReduceNode(
        id="synthesis",
        kind="synthesis",
        level=level + 1,
        tokens=model.count_tokens(answer),
        children=[n.id for n, _ in level_nodes],
    )
    tree.append(final)
    reduction = Reduction(
        text=answer, tree=tree, levels=level, calls=calls, input_tokens=input_tokens, context_window=window
    )
    ctx.metadata["reductions"][name] = reduction.as_metadata()
    await ctx.emit("reduction", {"name": name, "levels": level, "calls": calls, "input_tokens": input_tokens})
    return reduction


def _check_fits(model: Model, prompt: str, out_cap: int, step: str) -> None:
    need = model.count_tokens(prompt) + out_cap
    if need > model.context_window:
        raise WorkflowError(
            f"{step} would need {need} tokens but the context window is {model.context_window}; refusing to truncate",
            type="context_overflow",
            step=step,
        )


async def _all(ctx: WorkflowContext, coros: list[Any]) -> list[Any]:
    results = await ctx.concurrently(*coros)
    for r in results:
        if isinstance(r, StepFailed):
            raise r
    return results
