"""The package layout: stages import each other only through their public faces, one way."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "runner"
STAGES = sorted(p.name for p in RUNNER.iterdir() if (p / "__init__.py").is_file())


def stage_of(module: str) -> str:
    """``runner.engine.submit`` -> ``engine``; a top-level module is its own stage."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports() -> list[tuple[str, str, list[str], int]]:
    """(importing module, imported module, names, line) for every ``from runner...`` import."""
    found = []
    for path in sorted(RUNNER.rglob("*.py")):
        rel = path.relative_to(RUNNER.parent).with_suffix("")
        importer = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runner"):
                names = [alias.name for alias in node.names]
                found.append((importer, str(node.module), names, node.lineno))
    return found


def test_the_stages_are_subpackages() -> None:
    """The pipeline's stages each have a room of their own."""
    assert {"manifest", "api", "ledger", "engine", "emulator", "report"} <= set(STAGES)


def test_no_module_imports_another_modules_private_names() -> None:
    """A leading underscore means 'this module only': nobody else imports such a name."""
    leaks = [f"{who}:{line} imports {name} from {what}"
             for who, what, names, line in imports() for name in names
             if name.startswith("_") and name != "__version__"]  # fmt: skip
    assert leaks == []


@pytest.mark.parametrize("stage", STAGES)
def test_other_stages_import_only_the_public_face(stage: str) -> None:
    """From outside a stage, only ``runner.<stage>`` is imported, never its modules."""
    inside = f"runner.{stage}."
    strays = [f"{who}:{line} imports {what}" for who, what, _, line in imports()
              if what.startswith(inside) and stage_of(who) != stage]  # fmt: skip
    assert strays == []


def test_every_face_names_what_it_exports() -> None:
    """Each stage's ``__init__`` lists its public names in ``__all__``, and they exist."""
    import importlib

    for stage in STAGES:
        module = importlib.import_module(f"runner.{stage}")
        for name in module.__all__:
            assert getattr(module, name) is not None, f"runner.{stage}.{name}"


def test_stage_dependencies_point_one_way() -> None:
    """The graph of stage imports has no cycle (a stage's own modules aside)."""
    graph: dict[str, set[str]] = {}
    for who, what, _, _line in imports():
        source, target = stage_of(who) or who, stage_of(what) or what
        if source != target:
            graph.setdefault(source, set()).add(target)
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle


_PROBE = """
import sys
from runner import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
if sys.argv[1:] == ["client"]:
    from runner.api import Client
print("aiohttp" in sys.modules, "jsonschema" in sys.modules)
"""
EXAMPLE = str(RUNNER.parent / "jobs" / "example.yaml")


@pytest.mark.parametrize(
    ("argv", "jsonschema"),
    [(["--help"], False), (["validate", EXAMPLE], True), (["plan", "--json", EXAMPLE], True)],
    ids=["help", "validate", "plan"],
)
def test_offline_commands_do_not_import_aiohttp(argv: list[str], jsonschema: bool) -> None:
    """Commands without network use never load aiohttp (--help not jsonschema either)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True,
                          text=True, check=False, cwd=RUNNER.parent)
    assert done.stdout.splitlines()[-1] == f"False {jsonschema}", done.stderr


def test_the_probe_sees_aiohttp_when_the_client_is_used() -> None:
    """The check above can fail: asking runner.api for Client does load aiohttp."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROBE, "client"], capture_output=True,
                          text=True, check=False, cwd=RUNNER.parent)
    assert done.stdout.splitlines()[-1].startswith("True"), done.stderr
