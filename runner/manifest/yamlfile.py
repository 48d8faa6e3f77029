"""A strict YAML loader for manifests: JSON-shaped values that remember their positions.

YAML is parsed for JSON Schema, not for Python: only ``true``/``false`` are booleans (so
``no`` stays text), ``16:9`` stays the text ``16:9`` rather than a base-60 integer, dates
stay text, duplicate keys and unsupported tags are errors, and aliases are bounded in
depth and size before anything walks the tree (no "billion laughs").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, NoReturn, Protocol

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.error import Mark
from yaml.events import Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

#: Deepest nesting of lists and mappings, aliases included.
MAX_NESTING = 64
#: Most YAML nodes a document may expand to through aliases (stops "billion laughs").
MAX_NODES = 1_000_000

Pos = tuple[int, int]


class YamlMap(dict[str, Any]):
    """A YAML mapping that remembers where it, its keys and its values stand."""

    __slots__ = ("key_pos", "pos", "value_pos")

    def __init__(self, pos: Pos) -> None:
        super().__init__()
        self.pos = pos
        self.key_pos: dict[str, Pos] = {}
        self.value_pos: dict[str, Pos] = {}


class YamlSeq(list[Any]):
    """A YAML sequence that remembers where it and its items stand."""

    __slots__ = ("item_pos", "pos")

    def __init__(self, pos: Pos) -> None:
        super().__init__()
        self.pos = pos
        self.item_pos: list[Pos] = []


def _pos(mark: Mark | None) -> Pos:
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


class _Events(Protocol):
    """Where the composer reads YAML events from: libyaml's parser, or PyYAML's own."""

    def check_event(self, *choices: type[Event]) -> bool: ...
    def peek_event(self) -> Event | None: ...
    def get_event(self) -> Event | None: ...
    def dispose(self) -> None: ...


def _event_source(text: str) -> _Events:
    try:
        from yaml._yaml import CParser
    except ImportError:  # PyYAML built without libyaml: its own parser gives the same events
        return yaml.SafeLoader(text)
    return CParser(text)


class _Loader(Composer, SafeConstructor, Resolver):
    """YAML as JSON Schema sees it: YAML 1.2 core scalars, no timestamps, no surprises.

    Only ``true``/``false`` are booleans (``no`` stays text), ``16:9`` stays text (no
    base-60 ints), dates stay text so the prompt is what was written, and duplicate keys
    are reported instead of silently keeping the last one. Scanning and parsing run in
    libyaml when PyYAML has it (about 8x faster); composing stays here, for the limits.
    """

    def __init__(self, text: str) -> None:
        self.events = _event_source(text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.depth = 0
        self.nodes = 0
        self.anchored = False
        self.problems: list[tuple[Pos, str, str | None]] = []
        # The composer asks for every event several times: straight to the source, not
        # through the methods below (a third of the parse time went to that layer).
        self.check_event = self.events.check_event  # type: ignore[method-assign]
        self.peek_event = self.events.peek_event  # type: ignore[method-assign]
        self.get_event = self.events.get_event  # type: ignore[method-assign]

    def check_event(self, *choices: type[Event]) -> bool:
        """Whether the next event is one of ``choices`` (the composer's input)."""
        return self.events.check_event(*choices)

    def peek_event(self) -> Event | None:
        """The next event, left in place."""
        return self.events.peek_event()

    def get_event(self) -> Event | None:
        """The next event, consumed."""
        return self.events.get_event()

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        # PyYAML composes recursively: cap the depth before Python's recursion limit does.
        self.depth += 1
        self.nodes += 1
        try:
            if self.depth > MAX_NESTING and parent is not None:
                problem = f"nesting deeper than {MAX_NESTING} levels"
                raise ComposerError(None, None, problem, parent.start_mark)
            node = super().compose_node(parent, index)
            if parent is None:  # the root: compose_document forgets the anchors after it
                self.anchored = bool(self.anchors)
            return node
        finally:
            self.depth -= 1


@lru_cache(maxsize=1)
def _c_composer() -> Callable[[str], Any] | None:
    """libyaml's parser and composer with the scalar rules of :class:`_Loader`, when PyYAML
    has libyaml 0.2.5 or later (which caps nesting at 1,000 levels, so its recursive
    composer cannot overflow the C stack); else None."""
    try:
        from yaml._yaml import CParser, get_version
    except ImportError:
        return None
    if tuple(get_version()) < (0, 2, 5):
        return None

    resolvers = _Loader.yaml_implicit_resolvers
    starts = frozenset(key for key in resolvers if key)  # no '' key: '' is null, below
    scalar = Resolver.DEFAULT_SCALAR_TAG
    collections: dict[type[Node], str] = {MappingNode: Resolver.DEFAULT_MAPPING_TAG,
                   SequenceNode: Resolver.DEFAULT_SEQUENCE_TAG}

    class Composer(CParser, Resolver):  # libyaml calls these back once a node
        yaml_implicit_resolvers = resolvers

        def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
            # Resolver.resolve, minus what cannot apply here (path resolvers): most
            # scalars start with a letter no implicit type starts with.
            if kind is ScalarNode and (not implicit[0] or (value and value[0] not in starts)):
                return scalar
            if kind is not ScalarNode:
                return collections[kind]
            return str(Resolver.resolve(self, kind, value, implicit))  # type: ignore[no-untyped-call]

        def descend_resolver(self, *_: object) -> None:
            """No path resolvers: nothing to track."""

        def ascend_resolver(self) -> None:
            """No path resolvers: nothing to track."""

    return Composer


def _fast_tree(text: str) -> Node | None:
    """The node tree composed by libyaml, or None where only :class:`_Loader` can say
    exactly what is wrong, or may be right: anchors (aliases need the walk of
    :func:`_measure`), nesting deeper than ``MAX_NESTING``, more than ``MAX_NODES`` nodes,
    any YAML error (its message and position come from the slow path, as always)."""
    composer = _c_composer()
    if composer is None or "&" in text:  # no '&': no anchor, so no alias
        return None
    parser = composer(text)
    try:
        root: Node | None = parser.get_single_node()
    except yaml.YAMLError:
        return None
    finally:
        parser.dispose()
    if root is None or not _within_limits(root):
        return None
    return root


def _within_limits(root: Node) -> bool:
    """Whether a tree without aliases is at most ``MAX_NESTING`` deep and ``MAX_NODES`` big."""
    nodes = 1
    stack: list[tuple[Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, SequenceNode):
            children = node.value
        else:
            continue
        nodes += len(children)
        if nodes > MAX_NODES or (children and depth + 1 > MAX_NESTING):
            return False
        stack += [(child, depth + 1) for child in children if not isinstance(child, ScalarNode)]
    return True


def _construct_map(loader: _Loader, node: MappingNode) -> Iterator[YamlMap]:
    data = YamlMap(_pos(node.start_mark))
    yield data
    first: dict[str, Pos] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            where = _pos(key_node.start_mark)
            if key_node.value in first:
                line = first[key_node.value][0]
                message = f"duplicate key '{key_node.value}' (first at line {line})"
                hint = "YAML would silently keep only the last one: remove or rename one"
                loader.problems.append((where, message, hint))
            first.setdefault(key_node.value, where)
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            message = "a key must be plain text, not a list or mapping"
            loader.problems.append((_pos(key_node.start_mark), message, None))
            continue
        key = str(key_node.value)
        data[key] = loader.construct_object(value_node)
        data.key_pos[key] = _pos(key_node.start_mark)
        data.value_pos[key] = _pos(value_node.start_mark)


def _construct_seq(loader: _Loader, node: SequenceNode) -> Iterator[YamlSeq]:
    data = YamlSeq(_pos(node.start_mark))
    yield data
    for child in node.value:
        data.append(loader.construct_object(child))
        data.item_pos.append(_pos(child.start_mark))


def _construct_number(loader: _Loader, node: ScalarNode) -> int | float:
    text = loader.construct_scalar(node)
    try:
        number: int | float = int(text) if node.tag.endswith(":int") else float(text)
    except ValueError:
        number = math.nan
    if isinstance(number, float) and not math.isfinite(number):
        problem = f"{text[:40]!r} is not a usable number (too large, or not a number)"
        raise ConstructorError(None, None, problem, node.start_mark)
    return number


def _construct_bool(loader: _Loader, node: ScalarNode) -> bool:
    text = loader.construct_scalar(node).lower()
    if text not in ("true", "false"):
        raise ConstructorError(None, None, f"{text!r} is not true or false", node.start_mark)
    return text == "true"


def _construct_str(loader: _Loader, node: ScalarNode) -> str:
    return loader.construct_scalar(node)


def _construct_null(loader: _Loader, node: ScalarNode) -> None:
    return None


def _construct_other(loader: _Loader, node: Node) -> NoReturn:
    problem = f"the tag '{node.tag.replace('tag:yaml.org,2002:', '!!')}' is not supported"
    raise ConstructorError(None, None, problem, node.start_mark)


# Start from no implicit types at all, then add YAML 1.2 core's (no timestamps, no base 60).
_Loader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("int", r"^[-+]?[0-9]+$", "-+0123456789"),
    ("float", r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$", "-+.0123456789"),
    ("merge", r"^(?:<<)$", "<"),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_regexp), list(_first))
_Loader.yaml_constructors = {
    "tag:yaml.org,2002:map": _construct_map,
    "tag:yaml.org,2002:seq": _construct_seq,
    "tag:yaml.org,2002:str": _construct_str,
    "tag:yaml.org,2002:int": _construct_number,
    "tag:yaml.org,2002:float": _construct_number,
    "tag:yaml.org,2002:bool": _construct_bool,
    "tag:yaml.org,2002:null": _construct_null,
    None: _construct_other,
}


def _measure(node: Node) -> None:
    """Refuse alias bombs and recursive aliases before anything walks the tree."""
    known: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes below, height)
    active: set[int] = set()

    def visit(node: Node, level: int) -> tuple[int, int]:
        if id(node) in active:
            problem = "an alias points into its own anchor (a recursive structure)"
            raise ComposerError(None, None, problem, node.start_mark)
        if id(node) not in known:
            active.add(id(node))
            children: list[Node] = []
            if isinstance(node, SequenceNode):
                children = list(node.value)
            elif isinstance(node, MappingNode):
                children = [n for pair in node.value for n in pair]
            sizes = [visit(child, level + 1) for child in children]
            height = 1 + max((h for _, h in sizes), default=0)
            known[id(node)] = (1 + sum(s for s, _ in sizes), height)
            active.discard(id(node))
        size, height = known[id(node)]
        if level + height > MAX_NESTING + 1:
            problem = f"nesting deeper than {MAX_NESTING} levels (through aliases)"
            raise ComposerError(None, None, problem, node.start_mark)
        if size > MAX_NODES:
            problem = f"the document expands to more than {MAX_NODES:,} values through aliases"
            raise ComposerError(None, None, problem, node.start_mark)
        return size, height

    visit(node, 1)


_YAML_HINTS = (
    ("tab character", "indent with spaces; YAML does not allow tabs there"),
    ("nesting", "a manifest needs only a few levels; check the brackets"),
    ("mapping values are not allowed", "a value contains ': ' - put the whole value in quotes"),
    ("undefined alias", "define the anchor (&name) before using it (*name)"),
    ("constructor for the tag", "remove the tag: manifests hold text, numbers, lists, mappings"),
    ("single document", "one manifest per file: remove the extra '---'"),
    ("cannot start any token", "put the value in quotes"),
    ("through aliases", "use defaults or a matrix instead of many nested aliases"),
)


def parse_yaml(text: str) -> tuple[Any, list[tuple[Pos, str, str | None]]]:
    """The document (None when unusable) and the YAML problems found, with positions.

    libyaml composes the node tree when it can (:func:`_fast_tree`); whenever that path
    is not sure, the same text goes through the composer here, which says what is wrong.
    """
    loader = _Loader(text)
    try:
        node = _fast_tree(text)
        if node is not None:
            return loader.construct_document(node), loader.problems
        node = loader.get_single_node()
        if node is None:
            return None, [((1, 1), "the file has no content", "start with 'version: 1'")]
        if loader.anchored or loader.nodes > MAX_NODES:
            # Without an anchor there is no alias: the tree is as deep as composing found
            # (checked there) and has as many nodes as were composed.
            _measure(node)
        return loader.construct_document(node), loader.problems
    except yaml.MarkedYAMLError as exc:
        where = _pos(exc.problem_mark or exc.context_mark)
        message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        if _char_at(text, where) == "\t":
            message = "a tab character where YAML allows only spaces"
        hint = next((h for key, h in _YAML_HINTS if key in message), None)
        return None, [*loader.problems, (where, message, hint)]
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        where = (before.count("\n") + 1, exc.position - before.rfind("\n"))
        char = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        message = f"the control character U+{ord(char[:1] or ' '):04X} is not allowed in YAML"
        return None, [(where, message, "remove it, or write it escaped in a quoted string")]
    finally:
        loader.events.dispose()


def _char_at(text: str, pos: Pos) -> str:
    lines = text.split("\n")
    line = lines[pos[0] - 1] if 0 < pos[0] <= len(lines) else ""
    return line[pos[1] - 1 : pos[1]]
