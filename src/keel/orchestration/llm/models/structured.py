"""Validating what a model returned before anything downstream uses it.

A 200 can hide a refusal (the model's, or the provider's content filter), a truncation, output that is not JSON,
JSON of the wrong shape, or the right shape with drifted names (``user_name`` where ``userName`` was asked). Each
becomes a :class:`ModelOutputError` with a type and a JSON pointer, so it lands in the envelope as a precise error
rather than as a plausible wrong answer.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import jsonschema.validators
import pydantic
import referencing.exceptions
from pydantic import BaseModel

from keel.errors import ModelOutputError
from keel.orchestration.llm.models.base import ModelResponse

REPAIRABLE = frozenset({"schema_violation", "schema_drift"})


def check_output(resp: ModelResponse, output_type: type[BaseModel] | None) -> Any:
    """The validated output (a model instance, or the text), or raise :class:`ModelOutputError`."""
    if resp.refusal or resp.finish_reason == "refusal":
        reason = (resp.refusal or resp.text or "no reason given").strip()[:300]
        raise ModelOutputError(f"the model refused: {reason}", type="refusal", pointer="")
    if resp.finish_reason == "content_filter":
        # Not the model declining but the provider's filter cutting the answer off, often with nothing written:
        # a refusal all the same, never a successful empty answer.
        written = f"after {len(resp.text)} characters" if resp.text else "before any text"
        raise ModelOutputError(
            f"the provider's content filter stopped the answer {written} (finish_reason content_filter)",
            type="refusal",
            pointer="",
        )
    if output_type is None:
        return resp.text
    if resp.finish_reason == "length":
        raise ModelOutputError(
            f"the output was cut at the token limit ({resp.output_tokens} tokens) before it was complete",
            type="truncation",
            pointer="",
        )
    text = strip_fences(resp.text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelOutputError(
            f"the output is not JSON ({exc.msg} at character {exc.pos})", type="schema_violation", pointer=""
        ) from None
    try:
        return output_type.model_validate(data)
    except pydantic.ValidationError as exc:
        drift = find_drift(exc, data)
        if drift is not None:
            pointer, got, wanted = drift
            raise ModelOutputError(
                f"schema drift: the output has {got!r} where the schema names {wanted!r}",
                type="schema_drift",
                pointer=pointer,
            ) from None
        errors = exc.errors()
        first = pointer_of(errors[0]["loc"])
        detail = "; ".join(f"{pointer_of(e['loc'])}: {e['msg']}" for e in errors[:5])
        raise ModelOutputError(
            f"the output does not match the schema: {detail}", type="schema_violation", pointer=first
        ) from None


def adheres(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` is valid against the JSON Schema ``schema`` (its own draft, else 2020-12). A schema that
    cannot be applied (an unresolvable reference) says nothing about the answer: it counts as adhering."""
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    try:
        return bool(validator.is_valid(value))
    except referencing.exceptions.Unresolvable:
        return True


def strip_fences(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    return t.strip()


def pointer_of(loc: tuple[int | str, ...] | list[int | str]) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in loc)


def _norm(name: str) -> str:
    return re.sub(r"[_\-\s]", "", name).lower()


def find_drift(exc: pydantic.ValidationError, data: Any) -> tuple[str, str, str] | None:
    """A missing field whose object holds the same name in another casing: (pointer to it, found, expected)."""
    for err in exc.errors():
        if err["type"] != "missing" or not err["loc"]:
            continue
        *parent_loc, field = err["loc"]
        parent = data
        for part in parent_loc:
            try:
                parent = parent[part]
            except (KeyError, IndexError, TypeError):
                parent = None
                break
        if not isinstance(parent, dict):
            continue
        for key in parent:
            if key != field and _norm(str(key)) == _norm(str(field)):
                return pointer_of([*parent_loc, key]), str(key), str(field)
    return None


def repair_prompt(error: ModelOutputError, schema: dict[str, Any]) -> str:
    return (
        f"Your answer could not be used: {error.message} (at {error.pointer or '/'}). "
        f"Answer again with JSON only, valid against this schema, with exactly these field names:\n"
        f"{json.dumps(schema)}"
    )
