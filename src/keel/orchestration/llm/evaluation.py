"""Behavioural regression between pinned models: ``keel eval SUITE --model A [--baseline B] --runs N [--gate]``.

A suite (YAML or JSON) is a list of cases: a prompt, an optional system prompt, an optional JSON schema the answer
must follow, expected values at JSON pointers, and whether the model should refuse. A system prompt or a schema may
be a reference to the code that uses it (``{"ref": "keel.orchestration.workflows.document_analysis:Wording"}``: a
pydantic model's schema, or a string constant, ``format``-ted with the case's values), so a suite for a workflow
tests the prompts and schemas the workflow sends, never a copy that drifts from them.

Every case runs ``N`` times, each run with its own seed (``seed + run``) at the suite's temperature: the runs are
repeated draws, and the same command gives the same draws. Each answer passes or fails four checks:

* ``json``: the answer is JSON (code fences allowed), for a case with a schema;
* ``schema``: it is valid against the schema;
* ``expected``: every expected value is there (cases with ``expect``);
* ``refusal``: the model refused exactly when the case says it should (a refusal of an ordinary request fails).

Per check, the report gives the rate with its Wilson 95% interval and its ``n``, and the suite's threshold with a
verdict: ``ok`` when the whole interval clears the threshold, ``violated`` when the whole interval misses it,
``uncertain`` in between (more runs decide). Against a baseline it gives each difference and a two-sided
two-proportion z-test at the suite's ``alpha`` (default 0.05): a *significant regression* is a drop with p < alpha.
``--gate`` fails on a violated threshold or a significant regression, not on ``uncertain``: at alpha 0.05 two
identical models show a "significant" drop on one check about 2.5% of the time, which the tests hold it to.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import jsonschema.validators
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keel.errors import ConfigError, ModelOutputError, UpstreamError
from keel.orchestration.llm.intervals import Direction, JudgedRate, RateVerdict, judge, two_proportion_z_test
from keel.orchestration.llm.models.base import Message, Model, ModelResponse, ModelSettings
from keel.orchestration.llm.models.structured import check_output, strip_fences

__all__ = [
    "CHECKS",
    "CaseResult",
    "Comparison",
    "EvalReport",
    "ModelRun",
    "Suite",
    "compare",
    "load_suite",
    "run_suite",
]

Check = Literal["json", "schema", "expected", "refusal"]
CHECKS: tuple[Check, ...] = ("json", "schema", "expected", "refusal")


# -- the suite file (the edge: pydantic) ---------------------------------------------------------------------------


class Ref(BaseModel):
    """A value taken from keel's code: ``module:name``, a pydantic model (its JSON schema) or a string."""

    model_config = ConfigDict(extra="forbid")
    ref: str = Field(pattern=r"^[\w.]+:\w+$")
    format: dict[str, Any] = Field(default_factory=dict, description="For a string: str.format arguments.")

    def resolve(self) -> Any:
        module, _, name = self.ref.partition(":")
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"the suite refers to {self.ref!r}, which cannot be found: {exc}") from None
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value.model_json_schema()
        if isinstance(value, str):
            return value.format(**self.format) if self.format else value
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{self.ref!r} is neither a pydantic model, a string nor a JSON schema")


class Expect(BaseModel):
    """What the value at one JSON pointer must be; every condition given must hold."""

    model_config = ConfigDict(extra="forbid")
    equals: Any = None
    one_of: list[Any] | None = None
    contains: str | None = Field(None, description="A substring, compared without case.")
    min: float | None = None
    max: float | None = None
    nonempty: bool | None = None

    def holds(self, value: Any) -> bool:
        if self.equals is not None and value != self.equals:
            return False
        if self.one_of is not None and value not in self.one_of:
            return False
        if self.contains is not None and (
            not isinstance(value, str) or self.contains.casefold() not in value.casefold()
        ):
            return False
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if self.min is not None and not (number and value >= self.min):
            return False
        if self.max is not None and not (number and value <= self.max):
            return False
        return not (self.nonempty and not value)


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str = Field(min_length=1, max_length=120)
    system: Ref | str | None = Field(None, union_mode="left_to_right")
    prompt: str = Field(min_length=1)
    # A Ref first: a plain dict would take ``{"ref": …}`` for a schema (a Ref forbids any other key).
    schema_: Ref | dict[str, Any] | None = Field(None, alias="schema", union_mode="left_to_right")
    expect: dict[str, Expect] = Field(
        default_factory=dict, description="JSON pointer (``/risk``, ``/payment/value``) → what it must be."
    )
    refuse: bool = Field(False, description="The model should refuse this one.")
    max_tokens: int = Field(400, ge=1, le=8192)

    @model_validator(mode="after")
    def _pointers(self) -> Case:
        for pointer in self.expect:
            if pointer and not pointer.startswith("/"):
                raise ValueError(f"expect keys are JSON pointers starting with '/': {pointer!r}")
        return self


class Suite(BaseModel):
    """A suite file: cases, the thresholds each check's rate must clear, and the significance level."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    description: str = ""
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level of the baseline comparison.")
    temperature: float = Field(0.7, ge=0, le=2, description="Runs are draws at this temperature, seeded per run.")
    thresholds: dict[Check, float] = Field(default_factory=dict)
    cases: list[Case] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Suite:
        ids = [c.id for c in self.cases]
        if len(set(ids)) != len(ids):
            raise ValueError("case ids must be unique")
        for check, t in self.thresholds.items():
            if not 0 <= t <= 1:
                raise ValueError(f"threshold of {check} must be a rate in [0, 1], not {t}")
        return self


def load_suite(path: Path) -> Suite:
    """Read a suite from YAML (``.yaml``/``.yml``) or JSON; a bad file raises :class:`ConfigError` saying where."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the suite {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: {exc}") from None
    try:
        return Suite.model_validate(raw)
    except ValidationError as exc:
        detail = "; ".join(f"/{'/'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"{path} is not a suite: {detail}") from None


# -- running it (dataclasses inside) -------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class CaseResult:
    case: str
    run: int
    checks: dict[Check, bool]
    """Only the checks that apply to the case."""
    detail: str = ""
    """Why the first failed check failed."""


@dataclass(kw_only=True, slots=True)
class ModelRun:
    """One model's results over the suite."""

    model: str
    results: list[CaseResult] = field(default_factory=list)

    def rates(self, thresholds: dict[Check, float]) -> dict[Check, JudgedRate]:
        out: dict[Check, JudgedRate] = {}
        for check in CHECKS:
            outcomes = [r.checks[check] for r in self.results if check in r.checks]
            if outcomes:
                # every check is a rate of good answers, so its threshold is a floor
                out[check] = judge(sum(outcomes), len(outcomes), thresholds.get(check), Direction.floor)
        return out


@dataclass(kw_only=True, slots=True)
class Comparison:
    check: Check
    diff: float
    """The model's rate minus the baseline's."""
    p_value: float
    significant: bool

    @property
    def regression(self) -> bool:
        return self.significant and self.diff < 0


@dataclass(kw_only=True, slots=True)
class EvalReport:
    suite: Suite
    runs: int
    model: ModelRun
    baseline: ModelRun | None = None

    @property
    def rates(self) -> dict[Check, JudgedRate]:
        return self.model.rates(self.suite.thresholds)

    @property
    def comparisons(self) -> list[Comparison]:
        return compare(self.model, self.baseline, self.suite.alpha) if self.baseline is not None else []

    def gate_failures(self) -> list[str]:
        """What makes ``--gate`` fail: each violated threshold and each significant regression, said in words."""
        failed = [
            f"{check}: {r.successes}/{r.n} = {r.rate:.3f} (95% CI {r.low:.3f}-{r.high:.3f}) is below the "
            f"threshold {r.threshold}"
            for check, r in self.rates.items()
            if r.verdict is RateVerdict.violated
        ]
        failed += [
            f"{c.check}: {c.diff:+.3f} against the baseline, significant at alpha {self.suite.alpha} "
            f"(p = {c.p_value:.4f})"
            for c in self.comparisons
            if c.regression
        ]
        return failed

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "suite": self.suite.name,
            "runs": self.runs,
            "alpha": self.suite.alpha,
            "model": self.model.model,
            "checks": {k: v.as_dict() for k, v in self.rates.items()},
        }
        if self.baseline is not None:
            out["baseline"] = self.baseline.model
            out["baseline_checks"] = {k: v.as_dict() for k, v in self.baseline.rates(self.suite.thresholds).items()}
            out["comparison"] = {
                c.check: {"diff": round(c.diff, 6), "p_value": round(c.p_value, 6), "significant": c.significant}
                for c in self.comparisons
            }
        out["gate_failures"] = self.gate_failures()
        # What went wrong, answer by answer (the first 100): what to read before trusting or distrusting a rate.
        out["failed_answers"] = [
            {"model": run.model, "case": r.case, "run": r.run, "detail": r.detail}
            for run in (self.model, *([self.baseline] if self.baseline is not None else []))
            for r in run.results
            if not all(r.checks.values())
        ][:100]
        return out


def compare(model: ModelRun, baseline: ModelRun, alpha: float) -> list[Comparison]:
    """Each check both runs measured: the difference of the rates and whether it is significant at ``alpha``."""
    mine, theirs = model.rates({}), baseline.rates({})
    out = []
    for check in CHECKS:
        if check not in mine or check not in theirs:
            continue
        a, b = mine[check], theirs[check]
        test = two_proportion_z_test(a.successes, a.n, b.successes, b.n)
        out.append(Comparison(check=check, diff=test.diff, p_value=test.p_value, significant=test.p_value < alpha))
    return out


async def run_suite(
    suite: Suite,
    model: Model,
    *,
    runs: int,
    seed: int = 0,
    on_result: Callable[[CaseResult], None] | None = None,
) -> ModelRun:
    """Ask ``model`` every case ``runs`` times (run ``r`` with seed ``seed + r``) and check each answer. A provider
    error fails every check of that answer: a model that does not answer does not pass."""
    if runs < 1:
        raise ConfigError(f"runs must be at least 1, got {runs}")
    prepared = [_Prepared.of(case) for case in suite.cases]
    out = ModelRun(model=model.name)
    for run in range(runs):
        for case in prepared:
            result = await case.ask(model, run, ModelSettings(temperature=suite.temperature, seed=seed + run))
            out.results.append(result)
            if on_result is not None:
                on_result(result)
    return out


@dataclass(kw_only=True, slots=True)
class _Prepared:
    """A case with its references resolved and its schema's validator built once."""

    case: Case
    messages: list[Message]
    schema: dict[str, Any] | None
    validator: Any

    @classmethod
    def of(cls, case: Case) -> _Prepared:
        system = case.system.resolve() if isinstance(case.system, Ref) else case.system
        schema = case.schema_.resolve() if isinstance(case.schema_, Ref) else case.schema_
        validator = None
        if schema is not None:
            kind = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            try:
                kind.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ConfigError(f"case {case.id}: the schema is not valid: {exc.message}") from None
            validator = kind(schema)
        messages = [Message(role="system", content=system)] if system else []
        messages.append(Message(role="user", content=case.prompt))
        return cls(case=case, messages=messages, schema=schema, validator=validator)

    async def ask(self, model: Model, run: int, settings: ModelSettings) -> CaseResult:
        settings = ModelSettings(temperature=settings.temperature, seed=settings.seed, max_tokens=self.case.max_tokens)
        try:
            resp = await model.request(self.messages, output_schema=self.schema, settings=settings)
        except (UpstreamError, TimeoutError) as exc:
            return CaseResult(
                case=self.case.id, run=run, checks=dict.fromkeys(self._applicable(), False), detail=f"error: {exc}"
            )
        return self.check(resp, run)

    def _applicable(self) -> list[Check]:
        checks: list[Check] = ["refusal"]
        if self.schema is not None:
            checks += ["json", "schema"]
        if self.case.expect:
            checks.append("expected")
        return checks

    def check(self, resp: ModelResponse, run: int) -> CaseResult:
        checks: dict[Check, bool] = {}
        why: list[str] = []
        try:
            check_output(resp, None)  # the one place that says what a refusal is
            refused = False
        except ModelOutputError:
            refused = True
        checks["refusal"] = refused == self.case.refuse
        if not checks["refusal"]:
            why.append("refused" if refused else "did not refuse")
        value: Any = None
        parsed = False
        if not refused:
            try:
                value, parsed = json.loads(strip_fences(resp.text)), True
            except json.JSONDecodeError as exc:
                why.append(f"not JSON: {exc.msg}")
        if self.schema is not None:
            checks["json"] = parsed
            problem = next(iter(self.validator.iter_errors(value)), None) if parsed else None
            checks["schema"] = parsed and problem is None
            if problem is not None:
                why.append(f"schema: {problem.message}")
        if self.case.expect:
            missed = [p for p, e in self.case.expect.items() if not (parsed and _holds(e, value, p))]
            checks["expected"] = not missed
            if missed:
                why.append(f"unexpected value at {', '.join(missed)}")
        return CaseResult(case=self.case.id, run=run, checks=checks, detail="; ".join(why))


def _holds(expect: Expect, document: Any, pointer: str) -> bool:
    try:
        value = _resolve(document, pointer)
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    return expect.holds(value)


def _resolve(document: Any, pointer: str) -> Any:
    """RFC 6901: ``/a/0/b``, with ``~1`` for ``/`` and ``~0`` for ``~``."""
    value = document
    for token in pointer.split("/")[1:] if pointer else []:
        token = token.replace("~1", "/").replace("~0", "~")
        value = value[int(token)] if isinstance(value, list) else value[token]
    return value


def summary_rows(report: EvalReport) -> Sequence[tuple[str, ...]]:
    """The report as table rows (check, model rate and CI, n, threshold, verdict, baseline, diff, p): the CLI's."""
    rows = []
    base = report.baseline.rates(report.suite.thresholds) if report.baseline is not None else {}
    diffs = {c.check: c for c in report.comparisons}
    for check, r in report.rates.items():
        b, c = base.get(check), diffs.get(check)
        rows.append(
            (
                check,
                f"{r.rate:.3f} [{r.low:.3f}, {r.high:.3f}]" if r.rate is not None else "-",
                str(r.n),
                f"{r.threshold:g}" if r.threshold is not None else "-",
                r.verdict.value if r.verdict else "-",
                f"{b.rate:.3f} [{b.low:.3f}, {b.high:.3f}]" if b is not None and b.rate is not None else "-",
                f"{c.diff:+.3f}" if c is not None else "-",
                f"{c.p_value:.4f}{' *' if c.significant else ''}" if c is not None else "-",
            )
        )
    return rows
