"""Reports, for people and programs: the plan of a run, the model catalog, a ledger's state."""

from __future__ import annotations

from runner.report.html import default_page, refuse_ledger, refuse_special_file, write_html
from runner.report.jsonout import Later, materialized, write_json
from runner.report.plan import (
    models_listing,
    plan_document,
    plan_json,
    render_models,
    render_plan,
)
from runner.report.render import (
    Report,
    build_report,
    json_document,
    render_csv,
    render_json,
    render_table,
)

__all__ = [
    "Later",
    "Report",
    "build_report",
    "default_page",
    "json_document",
    "materialized",
    "models_listing",
    "plan_document",
    "plan_json",
    "refuse_ledger",
    "refuse_special_file",
    "render_csv",
    "render_json",
    "render_models",
    "render_plan",
    "render_table",
    "write_html",
    "write_json",
]
