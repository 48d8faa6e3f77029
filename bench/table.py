"""The benchmark's results: figures over repeats, table rows, and BENCHMARKS.md / .json.

A ``Figure`` is one quantity measured once per repeat; the table shows its median with the
min and max. A ``Row`` is one line of the table: ours, the naive client's, the bound, their
ratios, the target and whether it was met. ``write`` renders the rows, and keeps whatever
follows ``END_MARK`` in an existing BENCHMARKS.md (the hand-written analysis of the misses).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["END_MARK", "Figure", "Row", "write"]

END_MARK = "<!-- end of the generated part: text below this line is kept by `python -m bench` -->"


@dataclass(frozen=True, slots=True)
class Figure:
    """One quantity over repeats: ``values`` in ``unit``, shown with ``digits`` decimals."""

    values: tuple[float, ...]
    unit: str = ""
    digits: int = 2

    @classmethod
    def of(cls, values: list[float], unit: str = "", digits: int = 2) -> Figure:
        """A figure of the given values."""
        return cls(tuple(values), unit, digits)

    @property
    def median(self) -> float:
        """The median of the values."""
        return statistics.median(self.values)

    def text(self) -> str:
        """``median [min–max] unit``; just the median when there is one value or no spread."""
        d = self.digits
        mid = f"{self.median:,.{d}f}"
        low, high = f"{min(self.values):,.{d}f}", f"{max(self.values):,.{d}f}"
        spread = "" if low == high else f" [{low}–{high}]"
        return f"{mid}{spread}{' ' + self.unit if self.unit else ''}"

    def as_json(self) -> dict[str, Any]:
        """The figure as a JSON object."""
        return {
            "median": round(self.median, 6),
            "min": round(min(self.values), 6),
            "max": round(max(self.values), 6),
            "values": [round(v, 6) for v in self.values],
            "unit": self.unit,
        }


@dataclass(slots=True)
class Row:
    """One line of BENCHMARKS.md, and its raw samples for the JSON file."""

    scenario: str
    case: str
    metric: str
    ours: Figure | None
    naive: Figure | None = None
    bound: str = "—"
    ratios: dict[str, Figure] = field(default_factory=dict)
    target: str = "—"
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def ratio_text(self) -> str:
        """The ratios, e.g. ``0.93 of bound; 1.02× naive`` (keys: ``bound``, else a baseline)."""
        parts = []
        for name, figure in self.ratios.items():
            shown = Figure(figure.values, "", figure.digits).text()
            parts.append(f"{shown} of {name}" if name in ("bound", "R") else f"{shown}× {name}")
        return "; ".join(parts) or "—"

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return {
            "scenario": self.scenario,
            "case": self.case,
            "metric": self.metric,
            "ours": self.ours.as_json() if self.ours else None,
            "naive": self.naive.as_json() if self.naive else None,
            "bound": self.bound,
            "ratios": {k: v.as_json() for k, v in self.ratios.items()},
            "target": self.target,
            "met": self.met,
            "machine_note": self.note,
            **self.extra,
        }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `{meta['command']}` on {meta['date']}: {meta['commit']}",
        f"(`runner` imported from `{meta.get('runner_imported_from', '?')}`).",
        "Each figure is the median of the runs, with [min–max]; ratios are taken run by run",
        "(ours and naive alternate against the same emulator process) and then their median.",
        "Targets are from issue 15. **miss** marks a missed target; the analysis below the",
        "table says what limits it.",
        "",
        f"**Machine:** {meta['machine']}",
        "",
        "| scenario | case | metric | ours | naive | bound | ratio | target | met | machine note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        met = {True: "yes", False: "**miss**", None: "—"}[row.met]
        cells = [
            row.scenario,
            row.case,
            row.metric,
            row.ours.text() if row.ours else "—",
            row.naive.text() if row.naive else "—",
            row.bound,
            row.ratio_text(),
            row.target,
            met,
            row.note,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", *meta.get("notes", []), "", END_MARK, ""]
    return "\n".join(lines)


def write(rows: list[Row], meta: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``out/BENCHMARKS.md`` (keeping the text after ``END_MARK``) and its JSON twin."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "BENCHMARKS.md", out / "BENCHMARKS.json"
    kept = ""
    if md.exists():
        old = md.read_text(encoding="utf-8")
        if END_MARK in old:
            kept = old.split(END_MARK, 1)[1].lstrip("\n")
    md.write_text(_markdown(rows, meta) + kept, encoding="utf-8")
    doc = {"meta": meta, "rows": [row.as_json() for row in rows]}
    js.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return md, js
