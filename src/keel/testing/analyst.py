"""A scripted model for the ``document_analysis`` workflow, for tests and benchmarks only.

It reads each prompt the workflow sends (planning, a document's per-topic extraction, or a risk's wording) and
answers from the prompt's own text: an extraction quotes, per topic, the first sentence that shares a word with
the topic. Switches make it go wrong the ways real models do: unsure of the request, slow on one document,
malformed on one stage, inventing a quote, or wording risks as junk.

It plugs into :class:`keel.testing.models.FunctionModel` (``FunctionModel(analyst.function_reply)``) and into the
loopback :class:`keel.testing.fake_llm.FakeOpenAIServer` (``server.respond_with(analyst.http_reply)``), so the
same script drives in-process tests and a real ``keel serve`` talking HTTP to a fake provider.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from keel.orchestration.llm.models import Message
from keel.testing.fake_llm import Behaviour, Hang, Reply
from keel.testing.models import AgentInfo

FABRICATED_QUOTE = "The supplier may terminate this agreement at any time without notice or liability."

_LABEL = re.compile(r"Document (D\d+) \(")
_TOPIC_LINE = re.compile(r"^- ([a-z0-9_]+): (.+?) \((.+)\)$", re.MULTILINE)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]")
_FIGURE = re.compile(r"(?:USD |GBP |EUR |\$)?\d[\d,.]*%?(?: (?:days?|months?|years?|per cent))?")


@dataclass
class ScriptedAnalyst:
    confidence: float = 0.9
    questions: list[str] = field(default_factory=list)
    extract_delay_s: dict[str, float] = field(default_factory=dict)
    """Seconds a document's extraction takes, by label (``D1``) or ``*`` for every document."""
    malformed: set[str] = field(default_factory=set)
    """Stages (``plan``, ``extract``, ``risk``) answered with text that is not JSON; ``extract:D2`` for one
    document's call, ``risk:payment terms`` for one topic's."""
    fabricate: bool = False
    """Give :data:`FABRICATED_QUOTE`, which no document contains, as D1's quote for its first topic."""
    junk: bool = False
    """Word every risk the way a tiny model does: a number for a title and a rationale that cites nothing."""
    calls: list[str] = field(default_factory=list)
    """The stage of every prompt answered, in order."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- the two front doors ----------------------------------------------------------------------------------

    async def function_reply(self, messages: list[Message], info: AgentInfo) -> str:
        text, delay = self.answer([(m.role, m.content) for m in messages])
        if delay:
            await asyncio.sleep(delay)
        return text

    def http_reply(self, body: dict[str, Any]) -> Behaviour:
        pairs = [(str(m.get("role", "")), _content(m.get("content"))) for m in body.get("messages", [])]
        text, delay = self.answer(pairs)
        reply = Reply(text=text, model="analyst-2026-01-01", input_tokens=100, output_tokens=50, chunk_chars=64)
        return Hang(seconds=delay, reply=reply) if delay else reply

    # -- the script -----------------------------------------------------------------------------------------------

    def answer(self, messages: list[tuple[str, str]]) -> tuple[str, float]:
        system = next((c for r, c in messages if r == "system"), "")
        user = "\n\n".join(c for r, c in messages if r == "user")
        stage = _stage(system)
        found = _LABEL.search(user)
        label = found.group(1) if found else "D?"
        topic = user.split("\n", 1)[0].removeprefix("Topic: ") if stage == "risk" else ""
        with self._lock:
            self.calls.append(stage)
        if stage in self.malformed or f"{stage}:{label}" in self.malformed or f"{stage}:{topic}" in self.malformed:
            return f"Sorry, I cannot produce the {stage} right now.", 0.0
        if stage == "plan":
            return self._plan(), 0.0
        if stage == "extract":
            delay = self.extract_delay_s.get(label, self.extract_delay_s.get("*", 0.0))
            return self._extract(user, label), delay
        if stage == "risk":
            return self._risk(user, topic), 0.0
        return _condense(user), 0.0  # a map-reduce combine or synthesis

    def _plan(self) -> str:
        return json.dumps(
            {
                "goal": "Compare the documents' terms and list the risks.",
                "confidence": self.confidence,
                "questions": self.questions,
                "focus": [],
            }
        )

    def _extract(self, user: str, label: str) -> str:
        """Per topic, the sentence sharing most word stems with the topic's name (then its hint), and its figure as
        the value."""
        text, _, _ = user.partition("\nTopics:")
        sentences = [line.strip() for line in text.splitlines()[1:] if line.strip() and not line.startswith("[page ")]
        out: dict[str, dict[str, str]] = {}
        for key, name, hint in _TOPIC_LINE.findall(user):
            named, hinted = _stems(name), _stems(hint)

            def score(sentence: str, named: set[str] = named, hinted: set[str] = hinted) -> int:
                words = _stems(sentence)
                return 2 * len(named & words) + len(hinted & words)

            best = max(sentences, key=score, default="")
            quote = best if best and score(best) > 0 else ""
            figure = _FIGURE.search(quote)
            value = figure.group(0) if figure else " ".join(quote.split()[-4:]).rstrip(".")
            out[key] = {"quote": quote, "value": value}
        if self.fabricate and label == "D1":
            first = next((k for k, v in out.items() if v["quote"]), None)
            if first is not None:
                out[first] = {"quote": FABRICATED_QUOTE, "value": "any time"}
        return json.dumps(out)

    def _risk(self, user: str, topic: str) -> str:
        if self.junk:
            return json.dumps({"risk": "2" * 12, "severity": "high", "rationale": "It is important."})
        labels = sorted(set(re.findall(r"^(D\d+) \(", user, re.MULTILINE)))
        says = re.findall(r"\(in short: (.+?)\)$", user, re.MULTILINE)
        return json.dumps(
            {
                "risk": f"Inconsistent {topic} across the documents",
                "severity": "high" if "differently" in user else "medium",
                "rationale": f"{' and '.join(labels)} set {topic} as {' vs '.join(says)}, which cannot all hold.",
            }
        )


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z]{4,}", text.casefold())}


def _stage(system: str) -> str:
    for marker, stage in (
        ("You plan a document analysis", "plan"),
        ("You extract facts", "extract"),
        ("You are a contract reviewer", "risk"),
    ):
        if system.startswith(marker):
            return stage
    return "reduce"


def _condense(text: str) -> str:
    sentences = [s.strip() for s in _SENTENCE.findall(text)]
    return " ".join(sentences[:3])[:600] or "Nothing of note."


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts
        return "".join(str(p.get("text", "")) for p in value if isinstance(p, dict))
    return ""
