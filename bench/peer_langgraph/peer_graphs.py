"""The workloads of ``bench/peer_workflows.py`` as LangGraph graphs, for ``langgraph dev`` in ``bench/bench_peer.py``.

Each graph takes the same input body as keel's workflow of the same name, so the benchmark sends every server the
same JSON (LangGraph's state keys are the input's fields):

* ``peer_chain``: ``steps`` no-op nodes one after the other, each a superstep that LangGraph checkpoints
  (``steps=0`` goes from START straight to END: a no-op run);
* ``peer_tokens``: one node that streams ``n`` chunks through LangGraph's custom stream mode
  (``get_stream_writer``), ``pace_ms`` apart, each carrying its index and the wall clock it was emitted at;
* ``peer_fanout``: ``branches`` parallel nodes of ``seconds`` each, sent with ``Send``.

This module runs inside LangGraph's own virtualenv (see ``bench_peer.py``), never keel's: it imports langgraph only.
"""

from __future__ import annotations

import asyncio
import operator
import time
from typing import Annotated, Any, NotRequired, TypedDict

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

MAX_STEPS = 100  # the chain graph has this many nodes; ``steps`` says how many of them a run goes through


class ChainState(TypedDict):
    steps: int
    done: NotRequired[int]


def _chain_node(i: int) -> Any:
    async def noop(state: ChainState) -> dict[str, int]:
        return {"done": i + 1}

    return noop


def _chain_next(state: ChainState) -> str:
    done = state.get("done", 0)
    return f"noop-{done}" if done < state["steps"] else END


def _build_chain() -> Any:
    graph = StateGraph(ChainState)
    for i in range(MAX_STEPS):
        graph.add_node(f"noop-{i}", _chain_node(i))
        graph.add_conditional_edges(f"noop-{i}", _chain_next)
    graph.add_conditional_edges(START, _chain_next)
    return graph.compile()


class TokensState(TypedDict):
    n: int
    pace_ms: NotRequired[float]
    tokens: NotRequired[int]


async def _stream(state: TokensState) -> dict[str, int]:
    write = get_stream_writer()
    pace = state.get("pace_ms", 0.0) / 1000
    for i in range(state["n"]):
        # A model stream yields to the loop between chunks (it reads them from a socket): so does this.
        await asyncio.sleep(pace)
        write({"i": i, "text": f"t{i} ", "t": time.time()})
    return {"tokens": state["n"]}


def _build_tokens() -> Any:
    graph = StateGraph(TokensState)
    graph.add_node("stream", _stream)
    graph.add_edge(START, "stream")
    graph.add_edge("stream", END)
    return graph.compile()


class FanoutState(TypedDict):
    branches: int
    seconds: float
    naps: Annotated[list[float], operator.add]


class NapState(TypedDict):
    seconds: float


async def _nap(state: NapState) -> dict[str, list[float]]:
    await asyncio.sleep(state["seconds"])
    return {"naps": [state["seconds"]]}


def _send_naps(state: FanoutState) -> list[Send]:
    return [Send("nap", {"seconds": state["seconds"]}) for _ in range(state["branches"])]


def _build_fanout() -> Any:
    graph = StateGraph(FanoutState)
    graph.add_node("nap", _nap)
    graph.add_conditional_edges(START, _send_naps, ["nap"])
    graph.add_edge("nap", END)
    return graph.compile()


chain = _build_chain()
tokens = _build_tokens()
fanout = _build_fanout()
