"""The JSON Schemas that ship with apimart-batch, their validators, and their errors in words.

In a wheel the top-level ``schemas/`` folder is installed as ``runner/_schemas/``
(pyproject's hatch ``force-include``); in a source checkout it sits next to ``runner/``.
:func:`explain` turns jsonschema's ``ValidationError``s into one :class:`Problem` per thing
the user must fix, phrased as "what is wrong (what is allowed)" plus a hint.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from runner.errors import RunnerError

MANIFEST_SCHEMA = "manifest.schema.json"


@lru_cache(maxsize=8)
def schema_text(name: str = MANIFEST_SCHEMA) -> str:
    """The text of a shipped schema (what ``apimart-batch schema`` prints)."""
    packaged = resources.files("runner").joinpath("_schemas", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "schemas" / name
    try:
        return checkout.read_text(encoding="utf-8")
    except OSError as exc:
        msg = (
            f"schema {name!r} is missing from this installation ({exc.strerror})\n"
            "  hint: reinstall apimart-batch; the wheel carries it under runner/_schemas/"
        )
        raise RunnerError(msg) from exc


def load_schema(name: str = MANIFEST_SCHEMA) -> dict[str, Any]:
    """A fresh parsed copy of a shipped schema (callers may mutate it)."""
    schema: dict[str, Any] = json.loads(schema_text(name))
    return schema


@lru_cache(maxsize=1)
def manifest_validators() -> tuple[Validator, Validator]:
    """Validators for a whole manifest document and for one expanded job (``$defs/job``).

    The schema itself is checked first: a broken shipped schema is our bug, reported as such.
    """
    schema = load_schema(MANIFEST_SCHEMA)
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        msg = f"{MANIFEST_SCHEMA}: the shipped schema is invalid: {exc.message}"
        raise RunnerError(msg) from exc
    # Inlined local $refs validate about twice as fast (no lookups) and mean the same.
    inlined = _inline(schema, schema.get("$defs", {}))
    return cls(inlined), cls(inlined["$defs"]["job"])


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """``node`` with every ``#/$defs/...`` reference replaced by its target (no cycles here)."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, Mapping):
        return node
    inlined = {key: _inline(value, defs) for key, value in node.items() if key != "$ref"}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return {**_inline(defs[ref.removeprefix("#/$defs/")], defs), **inlined}
    return inlined


@dataclass(frozen=True, slots=True)
class Problem:
    """One schema violation in human words, located by a path into the validated instance.

    ``at_key`` asks to point at the key itself (an unknown key), not at its value.
    """

    path: tuple[str | int, ...]
    message: str
    hint: str | None = None
    at_key: bool = False


# Keywords that judge one value; several of them failing on the same value are one problem.
_VALUE_KEYWORDS = frozenset(
    {"type", "enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum",
     "minItems", "maxItems", "minProperties", "anyOf", "oneOf"}
)  # fmt: skip
_TYPE_WORDS = {
    "object": "a mapping (key: value)",
    "array": "a list",
    "string": "text",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}
#: Keys people bring from other APIs, and what to write instead.
_SYNONYMS = {
    "size": "this format calls it 'aspect_ratio'",
    "aspect": "this format calls it 'aspect_ratio'",
    "ratio": "this format calls it 'aspect_ratio'",
    "seconds": "this format calls it 'duration'",
    "length": "this format calls it 'duration'",
    "quality": "this format calls it 'resolution'",
    "n": "for several takes of one request, write 'repeat: N'",
    "count": "for several takes of one request, write 'repeat: N'",
    "prompts": "for several prompts, write 'matrix: {prompt: [...]}'",
    "images": "for several images, write 'matrix: {image: [...]}'",
}
_LEGACY_KEYS = frozenset(
    {"watermark", "thumbnail", "private", "style", "storyboard", "character_url",
     "character_timestamps", "remix_video_id"}
)  # fmt: skip
_REQUIRED_HINTS = {
    "version": "add 'version: 1' as the first line",
    "jobs": "add a 'jobs:' list, e.g. 'jobs: [{prompt: A cat surfing at dawn}]'",
    "model": "add 'model: sora-2' (or sora-2-pro) to this job or to defaults",
    "prompt": "add 'prompt: ...' to this job, or list prompts under 'matrix: {prompt: [...]}'",
}


def explain(validator: Validator, instance: Any) -> list[Problem]:
    """Validate ``instance`` and say what is wrong: one human :class:`Problem` per fix.

    Errors on the same value are one problem (jsonschema's ``best_match`` picks it, and
    descends into ``anyOf``/``oneOf``); unknown and missing keys are one problem each.
    """
    schema = validator.schema if isinstance(validator.schema, Mapping) else {}
    by_value: dict[tuple[str | int, ...], list[ValidationError]] = {}
    problems: list[Problem] = []
    for error in validator.iter_errors(instance):
        if error.validator in _VALUE_KEYWORDS:
            by_value.setdefault(tuple(error.absolute_path), []).append(error)
        else:
            problems.extend(_explain(error, schema))
    for group in by_value.values():
        best = best_match(group)
        if best is not None:
            problems.extend(_explain(best, schema))
    return problems


def _explain(error: ValidationError, schema: Mapping[str, Any]) -> list[Problem]:
    path = tuple(error.absolute_path)
    keyword: Any = error.validator
    expected: Any = error.validator_value
    value: Any = error.instance
    sub = error.schema if isinstance(error.schema, Mapping) else {}
    if keyword == "additionalProperties":
        known = list(sub.get("properties", {}))
        patterns = [re.compile(p) for p in sub.get("patternProperties", {})]
        extras = [k for k in value if k not in known and not any(p.search(k) for p in patterns)]
        return [_unknown_key(path, key, known, _keys_anywhere(schema)) for key in extras]
    if keyword == "required":
        return [
            Problem(path, f"missing required key '{key}'", _REQUIRED_HINTS.get(key))
            for key in expected
            if key not in value
        ]
    if keyword == "type":
        return [_wrong_type(path, expected, value)]
    condition, rule = _condition(error, schema)
    if keyword in ("enum", "const"):
        allowed = expected if keyword == "enum" else [expected]
        shown = ", ".join(_show(a, quote=False) for a in allowed)
        message = f"{_show(value)} is not allowed{condition} (allowed: {shown})"
        return [Problem(path, message, rule or _did_you_mean(value, allowed))]
    if keyword in ("pattern", "minLength") and isinstance(value, str) and not value.strip():
        return [Problem(path, "must not be blank")]
    if keyword == "pattern":
        title = sub.get("title", "value")
        rule = str(sub.get("description", "")).split(". ")[0].rstrip(".") or None
        return [Problem(path, f"{_show(value)} is not a valid {title}", rule)]
    if keyword in ("minItems", "maxItems", "minProperties", "minimum", "maximum"):
        return [_out_of_range(path, keyword, expected, value)]
    if keyword == "not" and "dependentSchemas" in error.absolute_schema_path:
        schema_path = list(error.absolute_schema_path)
        trigger = schema_path[schema_path.index("dependentSchemas") + 1]
        clash = expected.get("required", ["?"])[0]
        message = f"'{clash}' cannot be combined with '{trigger}'"
        return [Problem((*path, clash), message, sub.get("description"), at_key=True)]
    if keyword in ("anyOf", "oneOf"):
        forms = ", ".join(_title(schema, alt) for alt in expected)
        return [Problem(path, f"{_show(value)} matches none of the allowed forms ({forms})")]
    return [Problem(path, error.message)]


def _unknown_key(
    path: tuple[str | int, ...], key: str, known: list[str], anywhere: set[str]
) -> Problem:
    here = (*path, key)
    allowed = f"allowed here: {', '.join(known)}"
    if key in anywhere:
        return Problem(here, f"'{key}' is not allowed here", allowed, at_key=True)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if key in _LEGACY_KEYS:
        hint = "it belonged to an earlier Sora revision; the current API does not take it"
    elif key.lower() in _SYNONYMS:
        hint = _SYNONYMS[key.lower()]
    else:
        hint = f"did you mean '{close[0]}'?" if close else allowed
    return Problem(here, f"unknown key '{key}'", hint, at_key=True)


def _keys_anywhere(node: Any) -> set[str]:
    """Every property name the schema knows, wherever it is allowed."""
    if isinstance(node, list):
        return set().union(*(_keys_anywhere(item) for item in node))
    if not isinstance(node, Mapping):
        return set()
    keys = set(node.get("properties", {})) if isinstance(node.get("properties"), Mapping) else set()
    return keys.union(*(_keys_anywhere(value) for value in node.values()))


def _did_you_mean(value: Any, allowed: list[Any]) -> str | None:
    words = {str(a).lower(): str(a) for a in allowed if isinstance(a, str)}
    if not isinstance(value, str) or not words:
        return None
    close = difflib.get_close_matches(value.lower(), list(words), n=1, cutoff=0.6)
    return f"did you mean '{words[close[0]]}'?" if close else None


def _wrong_type(path: tuple[str | int, ...], expected: Any, value: Any) -> Problem:
    wanted = [expected] if isinstance(expected, str) else list(expected)
    words = " or ".join(_TYPE_WORDS.get(w, w) for w in wanted)
    got = _kind(value)
    hint = None
    if value is None:
        message = f"expected {words}, but the value is empty"
        hint = "give a value, or remove the key"
        return Problem(path, message, hint)
    if "string" in wanted and isinstance(value, bool | int | float):
        hint = "put the value in quotes so YAML reads it as text"
    elif {"integer", "number"} & set(wanted) and isinstance(value, str):
        hint = "write a bare number, without quotes or units (e.g. 8)"
    elif "array" in wanted and isinstance(value, str):
        hint = f'make it a list: ["{value}"]'
    shown = f" {_show(value)}" if not isinstance(value, dict | list) else ""
    return Problem(path, f"expected {words}, got {got}{shown}", hint)


def _out_of_range(path: tuple[str | int, ...], keyword: str, limit: Any, value: Any) -> Problem:
    if keyword == "minItems":
        noun = "item" if limit == 1 else "items"
        return Problem(path, f"needs at least {limit} {noun}")
    if keyword == "maxItems":
        hint = "one job takes one image; for several, use 'matrix: {image: [...]}'"
        return Problem(path, f"at most {limit} allowed, got {len(value)}", hint)
    if keyword == "minProperties":
        return Problem(path, "must not be empty")
    bound = "at least" if keyword == "minimum" else "at most"
    return Problem(path, f"{_show(value)} is out of range (must be {bound} {limit})")


def _condition(error: ValidationError, schema: Mapping[str, Any]) -> tuple[str, str | None]:
    """For an error inside an ``if``/``then``: the condition in words and the rule's text."""
    schema_path = list(error.absolute_schema_path)
    if "then" not in schema_path:
        return "", None
    rule = _node_at(schema, schema_path[: schema_path.index("then")])
    if not isinstance(rule, Mapping):
        return "", None
    consts = rule.get("if", {}).get("properties", {})
    words = [f"{key} {sub['const']}" for key, sub in consts.items() if "const" in sub]
    condition = f" for {' and '.join(words)}" if words else ""
    return condition, rule.get("description")


def _node_at(schema: Mapping[str, Any], schema_path: list[Any]) -> Any:
    """The subschema at ``schema_path``, following local ``$ref``s (jsonschema omits them)."""
    node: Any = schema
    for step in schema_path:
        while isinstance(node, Mapping) and step not in node and "$ref" in node:
            node = _deref(schema, node["$ref"])
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _deref(schema: Mapping[str, Any], ref: str) -> Any:
    node: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _title(schema: Mapping[str, Any], alternative: Any) -> str:
    if isinstance(alternative, Mapping) and "$ref" in alternative:
        alternative = _deref(schema, alternative["$ref"])
    if isinstance(alternative, Mapping):
        return str(alternative.get("title", alternative.get("type", "?")))
    return "?"


def _kind(value: Any) -> str:
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "boolean"), (int, "integer"), (float, "number"), (str, "text"),
        (dict, "a mapping"), (list, "a list"),
    )  # fmt: skip
    return next((word for cls, word in kinds if isinstance(value, cls)), type(value).__name__)


def _show(value: Any, *, quote: bool = True, width: int = 60) -> str:
    """A value as the user wrote it in YAML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = f"'{value}'" if quote else value
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
