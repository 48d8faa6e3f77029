"""Stage 1, the manifest: YAML files -> validated, expanded, priced jobs; nothing is sent.

``yamlfile`` parses strictly with line marks, ``schemas`` turns schema errors into words,
``catalog`` reads the model schemas of ``schemas/models/``, ``loader`` reads each file and
conducts the rest (``sources`` reads prompt files into matrix lists, ``expand`` entries into
combinations, ``jobs`` builds and validates each job with ``verdict`` and ``images``, ``ids``
names it, ``diagnostics`` says where a problem is), and ``pricing`` estimates what it costs
(``schemas/prices.json``).
"""

from __future__ import annotations

from runner.manifest import pricing
from runner.manifest.catalog import (
    COMMON_FIELDS,
    Catalog,
    ModelSpec,
    bundled_schema,
    load_catalog,
    manifest_validators,
    upload_pointers,
)
from runner.manifest.diagnostics import diagnostics_document, problem_count
from runner.manifest.loader import Manifest, load_manifests
from runner.manifest.pricing import (
    PriceTable,
    built_in_labels,
    built_in_prices,
    estimate,
    merged_prices,
    parse_price_override,
    rate_and_key,
    valid_resolutions,
)
from runner.manifest.schemas import schema_dir

__all__ = [
    "COMMON_FIELDS",
    "Catalog",
    "Manifest",
    "ModelSpec",
    "PriceTable",
    "built_in_labels",
    "built_in_prices",
    "bundled_schema",
    "diagnostics_document",
    "estimate",
    "load_catalog",
    "load_manifests",
    "manifest_validators",
    "merged_prices",
    "parse_price_override",
    "pricing",
    "problem_count",
    "rate_and_key",
    "schema_dir",
    "upload_pointers",
    "valid_resolutions",
]
