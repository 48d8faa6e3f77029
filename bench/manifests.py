"""Manifests the benchmarks run: explicit job lists and matrices of a given size.

Every job is a Seedance 2.0 text-to-video request (``model`` and ``duration`` in
``defaults``), so the emulator accepts all of them. Prompts are built from a fixed word list,
distinct per job, at the length asked for; a manifest's ``name`` namespaces its
Idempotency-Keys, so two runs of the same jobs under different names never meet a replay.
"""

from __future__ import annotations

import itertools
from pathlib import Path

__all__ = ["MATRIX_AXES", "explicit", "matrix", "prompt"]

MODEL = "doubao-seedance-2.0"
_WORDS = [
    "lighthouse",
    "storm",
    "coast",
    "waves",
    "fox",
    "snow",
    "forest",
    "city",
    "dusk",
    "night",
    "rain",
    "neon",
    "street",
    "coffee",
    "morning",
    "light",
    "paper",
    "boat",
    "gutter",
    "mountain",
    "ridge",
    "fog",
    "sunrise",
    "pine",
    "river",
    "canyon",
    "desert",
    "market",
    "lanterns",
    "harbor",
    "ferry",
    "meadow",
    "horses",
    "bridge",
    "train",
    "tunnel",
    "glacier",
    "aurora",
]
#: The matrix axes besides ``prompt``: 10 durations x 4 aspect ratios = 40 jobs per prompt.
MATRIX_AXES: dict[str, list[object]] = {
    "duration": list(range(4, 14)),
    "size": ['"16:9"', '"9:16"', '"1:1"', '"4:3"'],  # quoted: YAML 1.1 reads 16:9 as 969
}
_PER_PROMPT = len(MATRIX_AXES["duration"]) * len(MATRIX_AXES["size"])


def prompt(i: int, chars: int) -> str:
    """A distinct prompt for job ``i``: ``chars`` long, or just its tag if ``chars`` is shorter."""
    tag = f"take-{i:06d}"
    room = chars - len(tag) - 1
    if room <= 0:
        return tag
    start = i % len(_WORDS)
    text = ""
    for word in itertools.cycle(_WORDS[start:] + _WORDS[:start]):
        if len(text) >= room:
            break
        text += word + " "
    body = text[:room]
    # A trailing space would be stripped by YAML and shorten the prompt.
    return (body[:-1] + "s" if body.endswith(" ") else body) + " " + tag


def _head(name: str) -> list[str]:
    return [
        "version: 1",
        f"name: {name}",
        "defaults:",
        f"  model: {MODEL}",
        "  duration: 5",
        "jobs:",
    ]


def explicit(path: Path, n: int, *, name: str, prompt_chars: int = 80) -> Path:
    """Write ``n`` jobs, one entry each (``id`` and ``prompt``), to ``path``."""
    lines = _head(name)
    for i in range(n):
        lines.append(f"  - id: j{i:06d}")
        lines.append(f"    prompt: {prompt(i, prompt_chars)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def matrix(path: Path, n: int, *, name: str, prompt_chars: int = 200) -> Path:
    """Write ``n`` jobs as matrix entries: each entry is 250 prompts x ``MATRIX_AXES`` (10k jobs).

    ``n`` must be a multiple of 40 (one prompt's combinations); the last entry holds the rest.
    """
    if n % _PER_PROMPT:
        msg = f"matrix manifests come in multiples of {_PER_PROMPT} jobs (got {n})"
        raise ValueError(msg)
    prompts = n // _PER_PROMPT
    lines = _head(name)
    for entry, start in enumerate(range(0, prompts, 250)):
        lines.append(f"  - id: m{entry:03d}")
        lines.append("    matrix:")
        lines.append("      prompt:")
        for i in range(start, min(start + 250, prompts)):
            lines.append(f"        - {prompt(i, prompt_chars)}")
        for axis, values in MATRIX_AXES.items():
            lines.append(f"      {axis}: [{', '.join(str(v) for v in values)}]")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
