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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing import Registry

from runner.errors import RunnerError

MANIFEST_SCHEMA = "manifest.schema.json"


def schema_dir() -> Path:
    """The folder of the shipped schemas: ``runner/_schemas`` in a wheel, else ``schemas/``."""
    packaged = resources.files("runner").joinpath("_schemas")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "schemas"


@lru_cache(maxsize=8)
def schema_text(name: str = MANIFEST_SCHEMA) -> str:
    """The text of a shipped schema (what ``apimart-batch schema`` prints)."""
    try:
        return (schema_dir() / name).read_text(encoding="utf-8")
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


def checked_validator(
    schema: dict[str, Any], name: str, *, check: bool = True
) -> type[Validator]:
    """The validator class for ``schema`` (by its ``$schema``), after checking the schema
    unless ``check`` is false (the shipped schemas, which the tests check).

    A broken shipped schema is our bug, reported as such.
    """
    cls: type[Validator] = validator_for(schema, default=Draft202012Validator)
    if not check:
        return cls
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        msg = f"{name}: the shipped schema is invalid: {exc.message}"
        raise RunnerError(msg) from exc
    return cls


def inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """``node`` with every ``#/$defs/...`` reference replaced by its target (no cycles here).

    Inlined local ``$ref``s validate about twice as fast (no lookups) and mean the same.
    """
    return _inline(node, defs)


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """``node`` with every ``#/$defs/...`` reference replaced by its target (no cycles here)."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, Mapping):
        return node
    ref = node.get("$ref")
    local = isinstance(ref, str) and ref.startswith("#/$defs/")
    inlined = {k: _inline(v, defs) for k, v in node.items() if k != "$ref" or not local}
    if local:
        return {**_inline(defs[str(ref).removeprefix("#/$defs/")], defs), **inlined}
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
     "minItems", "maxItems", "minProperties", "maxProperties", "anyOf", "oneOf"}
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
#: Keys people bring from other APIs, and what to write instead (what one model calls
#: another's field is the catalog's ``x-apimart-aka``).
_SYNONYMS = {
    "seconds": "this format calls it 'duration'",
    "length": "this format calls it 'duration'",
    "n": "for several takes of one request, write 'repeat: N'",
    "count": "for several takes of one request, write 'repeat: N'",
    "prompts": "for several prompts, write 'matrix: {prompt: [...]}' "
               "(or read them from a file: 'matrix: {prompt: {file: prompts.txt}}')",
    "images": "for several images, write 'matrix: {image: [...]}'",
    "tags": "for your own tags, write 'metadata: {key: value}' (kept in the ledger, never sent)",
    "labels": "for your own tags, write 'metadata: {key: value}' (kept in the ledger, never sent)",
}
_REQUIRED_HINTS = {
    "version": "add 'version: 1' as the first line",
    "jobs": (
        "add a 'jobs:' list; a minimal manifest is: "
        "{version: 1, jobs: [{model: sora-2, prompt: A cat surfing at dawn}]}"
    ),
    "model": "add 'model: ...' to this job or to defaults ('apimart-batch models' lists them)",
    "prompt": "add 'prompt: ...' to this job, or list prompts under 'matrix: {prompt: [...]}'",
    "column": "name the CSV column that holds the prompts: {csv: products.csv, column: prompt}",
    "csv": "a column is read from a CSV file: {csv: products.csv, column: prompt}",
}


#: Says what to write instead of an unknown key, or None to fall back to "did you mean".
KeyHint = Callable[[str, list[str]], str | None]


def explain(
    validator: Validator,
    instance: Any,
    *,
    registry: Registry[Any] | None = None,
    key_hint: KeyHint | None = None,
) -> list[Problem]:
    """Validate ``instance`` and say what is wrong: one human :class:`Problem` per fix.

    Errors on the same value are one problem (jsonschema's ``best_match`` picks it, and
    descends into ``anyOf``/``oneOf``); unknown and missing keys are one problem each.

    Args:
        registry: resolves the non-local ``$ref``s of the schema (the model catalog), so
            the text of a rule (its ``description``) can become the hint.
        key_hint: what to say of an unknown key, given the keys allowed there.
    """
    schema = validator.schema if isinstance(validator.schema, Mapping) else {}
    context = _Context(schema, registry, key_hint)
    by_value: dict[tuple[str | int, ...], list[ValidationError]] = {}
    problems: list[Problem] = []
    for error in validator.iter_errors(instance):
        if error.validator in _VALUE_KEYWORDS:
            by_value.setdefault(tuple(error.absolute_path), []).append(error)
        else:
            problems.extend(_explain(error, context))
    for group in by_value.values():
        best = best_match(group)
        if best is not None:
            problems.extend(_explain(best, context))
    return problems


#: Keywords that say nothing about validity.
_ANNOTATIONS = frozenset(
    {"title", "description", "examples", "default", "$comment", "markdownDescription",
     "deprecated", "readOnly", "writeOnly"}
)  # fmt: skip
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
}
Check = Callable[[Any], bool]


def _never(_: Any) -> bool:
    return False


def surely_valid(schema: Any) -> Check:
    """A fast predicate: True only if ``schema`` (without ``$ref``) surely accepts the value.

    It understands a few keywords (types, lengths, patterns, bounds, properties, items,
    ``propertyNames``, ``dependentSchemas``, ``not`` of ``enum`` or ``required``, and
    ``if``/``then``, trusting only the ``then`` side); a schema
    with any other keyword gives a predicate that is never sure. False means "ask
    jsonschema", which then says what is wrong in its own words.
    """
    check = _compiled(schema)
    return check if check is not None else _never


def _compiled(schema: Any) -> Check | None:
    if schema is True or schema == {}:
        return lambda _: True
    if not isinstance(schema, Mapping):
        return None
    checks: list[Check] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS or keyword.startswith("x-"):
            continue
        check = _keyword(keyword, value, schema)
        if check is None:
            return None
        checks.append(check)
    if len(checks) == 1:
        return checks[0]

    def every(v: Any) -> bool:
        for check in checks:  # noqa: SIM110 - a loop, not all(): this runs 100,000s of times
            if not check(v):
                return False
        return True

    return every


def _keyword(keyword: str, value: Any, schema: Mapping[str, Any]) -> Check | None:
    if keyword == "type":
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(n in _TYPES for n in names):
            return None
        tests = [_TYPES[n] for n in names]
        return lambda v: any(test(v) for test in tests)
    if keyword == "if":
        # Sure only on the "then" side: a value the "if" part is not surely valid for may
        # still match it, so the "else" side is never trusted and jsonschema decides.
        test, sure = _compiled(value), _compiled(schema.get("then", True))
        if test is None or sure is None:
            return None
        return lambda v: test(v) and sure(v)
    if keyword in ("then", "else") and "if" in schema:
        return lambda _: True  # decided by "if" above
    if keyword == "pattern":
        pattern = re.compile(value)
        return lambda v: not isinstance(v, str) or pattern.search(v) is not None
    if keyword in ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
                   "maxProperties") and isinstance(value, int):
        kind = str if "Length" in keyword else list if "Items" in keyword else dict
        if keyword.startswith("min"):
            return lambda v: not isinstance(v, kind) or len(v) >= value
        return lambda v: not isinstance(v, kind) or len(v) <= value
    if keyword in ("minimum", "maximum") and isinstance(value, int | float):
        def bound(v: Any) -> bool:
            if not isinstance(v, int | float) or isinstance(v, bool):
                return True
            return v >= value if keyword == "minimum" else v <= value
        return bound
    if keyword == "required" and isinstance(value, list):
        return lambda v: not isinstance(v, dict) or all(k in v for k in value)
    if keyword == "properties" and isinstance(value, Mapping):
        props = {name: _compiled(sub) for name, sub in value.items()}
        if any(c is None for c in props.values()):
            return None
        known: dict[str, Check] = {k: c for k, c in props.items() if c is not None}

        def properties(v: Any) -> bool:
            if isinstance(v, dict):
                for key, item in v.items():
                    check = known.get(key)
                    if check is not None and not check(item):
                        return False
            return True

        return properties
    if keyword == "additionalProperties":
        if "patternProperties" in schema:
            return None
        other = _compiled(value)
        if other is None:
            return None
        names = set(schema.get("properties", {}))
        if value is True:
            return lambda _: True
        return lambda v: not isinstance(v, dict) or all(
            other(item) for k, item in v.items() if k not in names)
    if keyword == "items":
        each = _compiled(value)
        if each is None or "prefixItems" in schema:
            return None
        return lambda v: not isinstance(v, list) or all(each(item) for item in v)
    if keyword == "propertyNames":
        name = _compiled(value)
        if name is None:
            return None
        if isinstance(value, Mapping) and set(value) == {"not"}:
            outside = _outside(value["not"])
            if outside is not None:  # the usual propertyNames: none of these keys
                return lambda v: not isinstance(v, dict) or outside.isdisjoint(v)
        return lambda v: not isinstance(v, dict) or all(name(k) for k in v)
    if keyword == "dependentSchemas" and isinstance(value, Mapping):
        deps = {k: _compiled(sub) for k, sub in value.items()}
        if any(c is None for c in deps.values()):
            return None
        then: dict[str, Check] = {k: c for k, c in deps.items() if c is not None}
        return lambda v: not isinstance(v, dict) or all(
            check(v) for k, check in then.items() if k in v)
    if keyword == "not" and isinstance(value, Mapping) and len(value) == 1:
        return _not(value)
    return None


def _outside(schema: Any) -> frozenset[str] | None:
    """The texts of an ``enum`` of texts only, else None."""
    value = schema.get("enum") if isinstance(schema, Mapping) and len(schema) == 1 else None
    if isinstance(value, list) and all(isinstance(e, str) for e in value):
        return frozenset(value)
    return None


def _not(schema: Mapping[str, Any]) -> Check | None:
    """``not`` of an ``enum`` of texts, or of ``required``: sure when the value is outside."""
    ((keyword, value),) = schema.items()
    if keyword == "enum" and isinstance(value, list) and all(isinstance(e, str) for e in value):
        texts = frozenset(value)
        return lambda v: not isinstance(v, str) or v not in texts
    if keyword == "required" and isinstance(value, list) and value:
        return lambda v: isinstance(v, dict) and any(k not in v for k in value)
    return None


@dataclass(frozen=True, slots=True)
class _Context:
    schema: Mapping[str, Any]
    registry: Registry[Any] | None
    key_hint: KeyHint | None


def _explain(error: ValidationError, context: _Context) -> list[Problem]:
    schema = context.schema
    path = tuple(error.absolute_path)
    keyword: Any = error.validator
    expected: Any = error.validator_value
    value: Any = error.instance
    sub = error.schema if isinstance(error.schema, Mapping) else {}
    if keyword == "additionalProperties":
        known = list(sub.get("properties", {}))
        patterns = [re.compile(p) for p in sub.get("patternProperties", {})]
        extras = [k for k in value if k not in known and not any(p.search(k) for p in patterns)]
        anywhere = _keys_anywhere(schema)
        return [_unknown_key(path, key, known, anywhere, context.key_hint) for key in extras]
    if keyword == "required":
        return [
            Problem(path, f"missing required key '{key}'", _REQUIRED_HINTS.get(key))
            for key in expected
            if key not in value
        ]
    if keyword == "type":
        return [_wrong_type(path, expected, value)]
    if "propertyNames" in error.absolute_schema_path:
        schema_path = list(error.absolute_schema_path)
        names = _node_at(context, schema_path[: schema_path.index("propertyNames") + 1])
        why = names.get("description") if isinstance(names, Mapping) else None
        return [Problem((*path, str(value)), f"'{value}' is not allowed here", why, at_key=True)]
    condition, rule = _condition(error, context)
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
    if keyword in ("minItems", "maxItems", "minProperties", "maxProperties", "minimum", "maximum"):
        return [_out_of_range(path, keyword, expected, value)]
    if keyword == "not" and "dependentSchemas" not in error.absolute_schema_path:
        return [Problem(path, _rule_text(error, context) or error.message)]
    if keyword == "not" and "dependentSchemas" in error.absolute_schema_path:
        schema_path = list(error.absolute_schema_path)
        trigger = schema_path[schema_path.index("dependentSchemas") + 1]
        clash = expected.get("required", ["?"])[0]
        message = f"'{clash}' cannot be combined with '{trigger}'"
        return [Problem((*path, clash), message, sub.get("description"), at_key=True)]
    if keyword in ("anyOf", "oneOf"):
        if all(isinstance(alt, Mapping) and "title" in alt for alt in expected):
            forms = ", ".join(_title(schema, alt) for alt in expected)
            return [Problem(path, f"{_show(value)} matches none of the allowed forms ({forms})")]
        return [Problem(path, _rule_text(error, context) or error.message)]
    if keyword in ("maxLength",):
        return [Problem(path, f"is {len(value)} characters long; at most {expected}{condition}")]
    return [Problem(path, error.message, rule)]


def _rule_text(error: ValidationError, context: _Context) -> str | None:
    """The ``description`` of the rule that failed, phrased as the fix, when it has one."""
    node = _node_at(context, list(error.absolute_schema_path)[:-1])
    text = node.get("description") if isinstance(node, Mapping) else None
    return str(text) if text else None


def _unknown_key(
    path: tuple[str | int, ...],
    key: str,
    known: list[str],
    anywhere: set[str],
    key_hint: KeyHint | None = None,
) -> Problem:
    here = (*path, key)
    allowed = f"allowed here: {', '.join(known)}"
    special = key_hint(key, known) if key_hint else None
    if special:
        return Problem(here, f"unknown key '{key}'", special, at_key=True)
    if key in anywhere:
        return Problem(here, f"'{key}' is not allowed here", allowed, at_key=True)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if key.lower() in _SYNONYMS:
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
        one_image = limit == 1 and path[-1:] == ("image_urls",)
        several = "one job takes one image; for several, use 'matrix: {image: [...]}'"
        hint = several if one_image else None
        return Problem(path, f"at most {limit} allowed, got {len(value)}", hint)
    if keyword == "minProperties":
        return Problem(path, "must not be empty")
    if keyword == "maxProperties":
        return Problem(path, f"at most {limit} keys allowed, got {len(value)}")
    bound = "at least" if keyword == "minimum" else "at most"
    return Problem(path, f"{_show(value)} is out of range (must be {bound} {limit})")


def _condition(error: ValidationError, context: _Context) -> tuple[str, str | None]:
    """For an error inside ``if``/``then``s: the conditions in words and the rule's text."""
    schema_path = list(error.absolute_schema_path)
    words: list[str] = []
    rule: Mapping[str, Any] | None = None
    for index, step in enumerate(schema_path):
        if step != "then":
            continue
        node = _node_at(context, schema_path[:index])
        if not isinstance(node, Mapping):
            continue
        rule = node
        consts = node.get("if", {}).get("properties", {})
        for key, sub in consts.items():
            const = sub.get("const") if isinstance(sub, Mapping) and "const" in sub else None
            word = f"{key} {_show(const, quote=False)}" if const is not None else None
            if word and word not in words:
                words.append(word)
    condition = f" for {' and '.join(words)}" if words else ""
    return condition, rule.get("description") if rule is not None else None


def _node_at(context: _Context, schema_path: list[Any]) -> Any:
    """The subschema at ``schema_path``, following ``$ref``s (jsonschema omits them)."""
    root: Any = context.schema
    node: Any = root
    for step in schema_path:
        while isinstance(node, Mapping) and step not in node and "$ref" in node:
            root, node = _deref(context, root, node["$ref"])
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _deref(context: _Context, root: Any, ref: str) -> tuple[Any, Any]:
    """The (document, subschema) a ``$ref`` names: local, or through the registry."""
    if not ref.startswith("#"):
        if context.registry is None:
            return root, None
        uri, _, fragment = ref.partition("#")
        try:
            root = context.registry.resolver().lookup(uri).contents
        except Exception:  # noqa: BLE001 - an unresolvable $ref is reported by validation
            return root, None
        ref = "#" + fragment
    node: Any = root
    for part in ref.removeprefix("#").removeprefix("/").split("/"):
        if part:
            node = node.get(part) if isinstance(node, Mapping) else None
    return root, node


def _title(schema: Mapping[str, Any], alternative: Any) -> str:
    if isinstance(alternative, Mapping) and "$ref" in alternative:
        alternative = _deref(_Context(schema, None, None), schema, alternative["$ref"])[1]
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
