"""A scripted model for the ``document_analysis`` workflow, for tests and benchmarks only.

It reads each prompt the workflow sends (planning, a document's summary, the comparison, the risks, or a
map-reduce combine) and answers from the prompt's own text: summaries quote the document's first sentences,
risks quote the passages they were shown. Switches make it go wrong the ways real models do: unsure of the
request, slow on one document, malformed on one stage, or inventing a quote.

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

from keel.orchestration.models import Message
from keel.testing.fake_llm import Behaviour, Hang, Reply
from keel.testing.models import AgentInfo

FABRICATED_QUOTE = "The supplier may terminate this agreement at any time without notice or liability."

_LABEL = re.compile(r"Document (D\d+) \(")
_PASSAGE = re.compile(r"^\[(D\d+) p\.(\d+)\] (.+)$", re.MULTILINE)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]")


@dataclass
class ScriptedAnalyst:
    confidence: float = 0.9
    questions: list[str] = field(default_factory=list)
    summary_delay_s: dict[str, float] = field(default_factory=dict)
    """Seconds a document's summary takes, by label (``D1``) or ``*`` for every document."""
    malformed: set[str] = field(default_factory=set)
    """Stages (``plan``, ``summary``, ``compare``, ``risks``) answered with text that is not JSON; ``risks:D2``
    (``summary:D2``) for one document's call only."""
    fabricate: bool = False
    """Cite :data:`FABRICATED_QUOTE`, which no document contains, as the first risk's evidence."""
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
        with self._lock:
            self.calls.append(stage)
        if stage in self.malformed or f"{stage}:{label}" in self.malformed:
            return f"Sorry, I cannot produce the {stage} right now.", 0.0
        if stage == "plan":
            return self._plan(), 0.0
        if stage == "summary":
            delay = self.summary_delay_s.get(label, self.summary_delay_s.get("*", 0.0))
            return self._summary(user), delay
        if stage == "compare":
            return self._compare(user), 0.0
        if stage == "risks":
            return self._risks(user), 0.0
        return _condense(user), 0.0  # a map-reduce combine or synthesis

    def _plan(self) -> str:
        return json.dumps(
            {
                "goal": "Summarise the documents, compare their terms and list the risks.",
                "confidence": self.confidence,
                "questions": self.questions,
                "focus": ["payment terms", "liability"],
            }
        )

    @staticmethod
    def _summary(user: str) -> str:
        pages = re.split(r"\[page (\d+)\]\n", user)
        points = []
        for number, text in zip(pages[1::2], pages[2::2], strict=False):
            for sentence in _SENTENCE.findall(text)[:2]:
                points.append({"point": sentence.strip()[:290], "page": int(number)})
        body = " ".join(p["point"] for p in points[:3]) or _condense(user)
        return json.dumps({"summary": body[:1100], "key_points": points[:6]})

    @staticmethod
    def _compare(user: str) -> str:
        labels = sorted(set(re.findall(r"\[(D\d+)\]", user))) or ["D1", "D2"]
        return json.dumps(
            {
                "overlaps": [{"topic": "scope", "documents": labels, "detail": "Each document sets commercial terms."}],
                "conflicts": [
                    {
                        "topic": "payment terms",
                        "documents": labels[:2],
                        "detail": "The documents set different payment deadlines.",
                    }
                ],
                "summary": "The documents overlap in scope and conflict on payment terms.",
            }
        )

    def _risks(self, user: str) -> str:
        risks: list[dict[str, Any]] = []
        for label, page, text in _PASSAGE.findall(user)[:3]:
            words = text.split()
            quote = " ".join(words[: min(10, len(words))])
            risks.append(
                {
                    "risk": f"Terms in {label} may not match the other documents",
                    "severity": "high" if not risks else "medium",
                    "rationale": "The passage sets terms that differ across the documents.",
                    "evidence": [{"document": label, "page": int(page), "quote": quote}],
                }
            )
        if self.fabricate and risks and risks[0]["evidence"][0]["document"] == "D1":
            risks[0]["evidence"] = [
                {"document": risks[0]["evidence"][0]["document"], "page": 1, "quote": FABRICATED_QUOTE}
            ]
        return json.dumps({"risks": risks})


def _stage(system: str) -> str:
    for marker, stage in (
        ("You plan a document analysis", "plan"),
        ("You summarise a document", "summary"),
        ("You compare documents", "compare"),
        ("You find the risks", "risks"),
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
