"""The generated document sets of the flagship eval (bench/flagship_sets.py) and its scorer; no model."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pypdf import PdfReader

from keel.orchestration.workflows.document_analysis import (
    CHECKLIST,
    Insight,
    KeyPoint,
    _compare,
    same_position,
    sentences,
)
from keel.testing.pdfs import WRAP_AT

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import flagship_sets as fs  # noqa: E402

SETS = fs.generate()
CUES = {t.name: t for t in CHECKLIST}


def test_generation_is_deterministic() -> None:
    assert fs.generate() == SETS
    assert fs.generate(24, 2026) == SETS
    assert fs.generate(24, 7) != SETS
    assert fs.generate(5) == fs.generate(5)


def test_shape_of_the_sets() -> None:
    assert len(SETS) >= 20
    assert len(fs.generate(30)) == 30
    assert len({s.name for s in SETS}) == len(SETS)
    amended = [s for s in SETS if len(s.documents) == 3]
    assert 6 <= len(amended) <= 10  # about a third
    for s in SETS:
        assert len(s.documents) in (2, 3)
        assert len({d.name for d in s.documents}) == len(s.documents)
        assert all(d.name.endswith(".pdf") for d in s.documents)
        assert s.request.strip()
        assert 3 <= len(s.conflicts) <= 5, s.name
        assert 1 <= len(s.risks) <= 2, s.name
        assert len(s.agreements) >= 1, s.name
        assert [p.kind for p in s.planted] == sorted((p.kind for p in s.planted), key=["conflict", "risk"].index)
        for p in s.planted + s.agreements + s.singles:
            assert p.topic in fs.TOPICS
            assert len(p.docs) == len(p.values) and all(0 <= d < len(s.documents) for d in p.docs)
        for p in s.risks + s.singles:
            assert len(p.docs) == 1 and p.docs[0] in (0, 1)
            others = [d for i, d in enumerate(s.documents) if i != p.docs[0]]
            assert all(p.topic not in d.statements for d in others), (s.name, p.topic)
        if len(s.documents) == 3:
            # the amendment changes one term of the first agreement: a planted conflict between them
            (amend,) = [p for p in s.conflicts if p.docs == (0, 2)]
            assert list(s.documents[2].statements) == [amend.topic]
            assert "AMENDMENT" in s.documents[2].text
        # each topic is planted once, but for an amendment that changes a term D1 and D2 already conflict on
        pairs = [p.topic for p in s.conflicts if p.docs == (0, 1)]
        others = [p.topic for p in s.risks + s.agreements + s.singles]
        assert len(set(pairs + others)) == len(pairs + others), s.name
        assert all(p.topic not in others for p in s.conflicts if p.docs == (0, 2))


def test_planted_values_are_in_the_documents() -> None:
    for s in SETS:
        for p in s.planted + s.agreements + s.singles:
            for d, value in zip(p.docs, p.values, strict=True):
                doc = s.documents[d]
                sentence = doc.statements[p.topic]
                assert sentence in doc.text
                assert fs.shows_value(value, sentence, [v for v in p.values if v != value]), (s.name, p, sentence)
                assert CUES[p.topic].concerns(sentence), (p.topic, sentence)  # the workflow would keep the quote
                if not re.search(r"\d", value):
                    words = [w for w in re.findall(r"[a-z]+", value.casefold()) if len(w) > 3]
                    assert any(w[:5] in sentence.casefold() for w in words), (value, sentence)


def test_conflicts_differ_and_agreements_agree_by_the_comparator() -> None:
    for s in SETS:
        for p in s.conflicts:
            a, b = p.values
            assert a != b and not same_position(a, b), (s.name, p)
            sa, sb = (s.documents[d].statements[p.topic] for d in p.docs)
            if re.search(r"\d", sa + sb):
                assert not same_position(sa, sb), (sa, sb)


def test_agreements_use_different_wording() -> None:
    assert sum(len(s.agreements) for s in SETS) >= len(SETS)
    for s in SETS:
        for p in s.agreements:
            a, b = (s.documents[d].statements[p.topic] for d in p.docs)
            assert p.values[0] == p.values[1]
            assert a != b
            assert _template(a) != _template(b), (a, b)
            if re.search(r"\d", a + b):
                assert same_position(a, b), (a, b)  # the same figures


def _template(sentence: str) -> str:
    """The sentence without its roles, so that only the phrasing is compared."""
    return re.sub(r"\b(Supplier|Vendor|Provider|Customer|Client)\b", "X", sentence)


def test_every_topic_has_several_phrasings() -> None:
    for topic, options in fs.OPTIONS.items():
        assert options, topic
        for option in options:
            assert len(set(option.templates)) >= 3, (topic, option.value)
    used: dict[str, set[str]] = {}
    for s in SETS:
        for d in s.documents:
            for topic, sentence in d.statements.items():
                used.setdefault(topic, set()).add(_template(re.sub(r"\d+", "N", sentence)))
    assert set(used) == set(fs.TOPICS)
    assert all(len(v) >= 3 for v in used.values()), {k: len(v) for k, v in used.items()}


def test_documents_are_short_agreements_with_fillers() -> None:
    for s in SETS:
        for i, doc in enumerate(s.documents):
            assert 1 <= len(doc.pages) <= 2
            lines = doc.text.splitlines()
            assert all(len(line) <= WRAP_AT for line in lines), doc.name  # no sentence is wrapped in the PDF
            clauses = [line for line in lines if re.match(r"\d+\. ", line)]
            if i < 2:
                assert 6 <= len(clauses) <= 10, (doc.name, len(clauses))
                assert len(clauses) > len(doc.statements)  # services and fillers concern no topic
            for sentence in doc.statements.values():
                assert sentence in lines or any(line.endswith(" " + sentence) for line in lines)


def test_the_workflow_reads_each_statement_as_whole_sentences() -> None:
    """Cut into sentences as the workflow cuts a page, a document gives back each statement whole (no heading or
    introduction glued to it), and one of its sentences states the planted value."""
    for s in SETS:
        for p in s.planted + s.agreements + s.singles:
            for d, value in zip(p.docs, p.values, strict=True):
                doc = s.documents[d]
                cut = {text for _, text in sentences([{"page": n, "text": t} for n, t in enumerate(doc.pages, 1)])}
                parts = [text for _, text in sentences([{"page": 1, "text": doc.statements[p.topic]}])]
                assert parts and all(part in cut for part in parts), (doc.name, parts)
                assert any(fs.shows_value(value, part) and CUES[p.topic].concerns(part) for part in parts)


def test_score_a_perfect_result() -> None:
    for s in SETS:
        result = fs.perfect_result(s)
        got = fs.score(s, result)
        assert got.misses == [], (s.name, got.misses)
        assert got.found_conflicts == got.planted_conflicts == len(s.conflicts)
        assert got.false_conflicts == 0
        assert got.found_risks == got.surfaced_risks == got.planted_risks == len(s.risks)
        assert got.worded_conflicts == got.planted_conflicts
        assert got.conflict_recall == got.conflict_precision == got.risk_recall == 1.0
    total = fs.summed([fs.score(s, fs.perfect_result(s)) for s in SETS])
    assert total.planted_conflicts == sum(len(s.conflicts) for s in SETS) == total.found_conflicts


def test_score_the_workflows_own_comparison_of_a_perfect_extraction() -> None:
    """The comparison table as the workflow computes it from ideal extractions: it finds exactly the planted
    conflicts, and the scorer reads its findings' labels and details."""
    topics = list(CHECKLIST)
    for s in SETS:
        perfect = fs.perfect_result(s)
        insights = [
            Insight(
                document=f"doc_{label}",
                label=label,
                source=f"upload:{doc.name}",
                summary="",
                key_points=[
                    KeyPoint(topic=row["topic"], point=c["value"], quote=c["quote"], page=1)
                    for row in perfect["comparison"]["table"]
                    for c in row["cells"]
                    if c["label"] == label
                ],
                condensed=False,
                windows=1,
            )
            for label, doc in zip(s.labels, s.documents, strict=True)
        ]
        docs = [SimpleNamespace(label=label, name=d.name) for label, d in zip(s.labels, s.documents, strict=True)]
        comparison = _compare(SimpleNamespace(topics=topics, docs=docs), insights)  # type: ignore[arg-type]
        assert {c.topic for c in comparison.conflicts} == {p.topic for p in s.conflicts}, s.name
        assert {o.topic for o in comparison.overlaps} == {p.topic for p in s.agreements}, s.name
        got = fs.score(s, {"comparison": comparison.model_dump(), "risks": []})
        assert got.found_conflicts == got.planted_conflicts and got.false_conflicts == 0, got.misses
        assert got.surfaced_risks == got.planted_risks and got.found_risks == 0


def test_score_an_empty_or_failed_result() -> None:
    for s in SETS:
        empty = fs.score(s, {"comparison": {"table": [], "conflicts": []}, "risks": []})
        assert empty.found_conflicts == empty.false_conflicts == empty.reported_conflicts == 0
        assert empty.found_risks == empty.surfaced_risks == empty.worded_conflicts == 0
        assert empty.planted_conflicts == len(s.conflicts) and empty.planted_risks == len(s.risks)
        assert empty.conflict_recall == 0.0 and empty.failed == 0
        assert len(empty.misses) == 2 * len(s.conflicts) + len(s.risks)
        no_comparison = fs.score(s, {"comparison": None, "risks": None})
        assert no_comparison.found_conflicts == 0 and no_comparison.found_risks == 0
        failed = fs.score(s, None)
        assert failed.failed == 1 and failed.found_conflicts == 0 and failed.misses


def _set_with(kind: str) -> fs.DocSet:
    return next(s for s in SETS if getattr(s, kind))


def test_a_conflict_on_an_agreed_topic_is_false() -> None:
    s = _set_with("agreements")
    result = fs.perfect_result(s)
    agreed = s.agreements[0]
    result["comparison"]["conflicts"].append(
        {"topic": agreed.topic.upper(), "labels": ["D1", "D2"], "detail": "D1 (a.pdf): x; D2 (b.pdf): y"}
    )
    got = fs.score(s, result)
    assert got.false_conflicts == 1 and got.reported_conflicts == len(result["comparison"]["conflicts"])
    assert got.found_conflicts == got.planted_conflicts
    assert got.conflict_precision < 1.0
    assert any("planted agreement" in m for m in got.misses)


def test_a_conflict_needs_its_documents_and_their_values() -> None:
    s = SETS[0]
    conflict = next(p for p in s.conflicts if p.docs == (0, 1))
    topic = conflict.topic

    def without(mutate: Any) -> fs.Score:
        result = fs.perfect_result(s)
        mutate(result)
        return fs.score(s, result)

    def drop_label(result: dict[str, Any]) -> None:
        finding = next(f for f in result["comparison"]["conflicts"] if f["topic"] == topic)
        finding["labels"] = ["D1"]

    def blank_value(result: dict[str, Any]) -> None:
        finding = next(f for f in result["comparison"]["conflicts"] if f["topic"] == topic)
        finding["detail"] = "D1 (x.pdf): ?; D2 (y.pdf): ?"
        row = next(r for r in result["comparison"]["table"] if r["topic"] == topic)
        for cell in row["cells"]:
            if cell["label"] == "D2":
                cell["value"] = cell["quote"] = "as agreed"

    for mutate in (drop_label, blank_value):
        got = without(mutate)
        assert got.found_conflicts == got.planted_conflicts - 1, mutate.__name__
        assert any(topic in m for m in got.misses)
    # the detail alone is enough when the table is missing
    result = fs.perfect_result(s)
    result["comparison"]["table"] = []
    assert fs.score(s, result).found_conflicts == len(s.conflicts)


def test_a_risk_is_found_by_its_evidence() -> None:
    s = _set_with("risks")
    risk = s.risks[0]
    result = fs.perfect_result(s)
    result["risks"] = [r for r in result["risks"] if r["topic"] != risk.topic]
    got = fs.score(s, result)
    assert got.found_risks == got.planted_risks - 1
    assert got.surfaced_risks == got.planted_risks  # the table still shows it
    wrong = copy.deepcopy(fs.perfect_result(s))
    for r in wrong["risks"]:
        if r["topic"] == risk.topic:
            r["evidence"] = [{"label": "D9", "quote": "x"}]
    assert fs.score(s, wrong).found_risks == len(s.risks) - 1


@pytest.mark.parametrize(
    ("value", "text", "others", "expected"),
    [
        ("30 days", "within thirty (30) days", (), True),
        ("30 days", "payable within thirty days", (), True),
        ("30 days", "within 3 days", (), False),
        ("30 days", "within 130 days", (), False),
        ("USD 50,000", "capped at 50000 dollars", (), True),
        ("England and Wales", "the laws of England", ("State of Delaware",), True),
        ("State of New York", "the State of Delaware", ("State of Delaware",), False),
        ("renews automatically", "Renewal is automatic for 12-month periods", (), True),
        ("non-exclusive", "engaged on a non-exclusive basis", ("24 months",), True),
        ("unlimited", "capped at 12 months of fees", ("12 months",), False),
    ],
)
def test_shows_value(value: str, text: str, others: tuple[str, ...], expected: bool) -> None:
    assert fs.shows_value(value, text, others) is expected


def test_write_pdfs_gives_back_every_sentence(tmp_path: Path) -> None:
    s = next(s for s in SETS if len(s.documents) == 3 and any(len(d.pages) == 2 for d in s.documents))
    paths = fs.write_pdfs(s, tmp_path / s.name)
    assert [p.name for p in paths] == [d.name for d in s.documents]
    for path, doc in zip(paths, s.documents, strict=True):
        reader = PdfReader(path)
        assert len(reader.pages) == len(doc.pages)
        lines = {" ".join(line.split()) for page in reader.pages for line in (page.extract_text() or "").splitlines()}
        for sentence in doc.statements.values():
            assert sentence in lines or any(line.endswith(" " + sentence) for line in lines), sentence


def test_main_prints_a_summary_and_one_set(capsys: pytest.CaptureFixture[str]) -> None:
    fs.main(["--n", "20", "--show", "1"])
    out = capsys.readouterr().out
    assert "set-20:" in out and "== set-02:" in out and "[page 1]" in out
