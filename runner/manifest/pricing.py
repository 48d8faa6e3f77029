"""Estimated prices: USD per second of video, by model and resolution, from data.

APIMart bills per generated second and publishes no price table. The built-in estimates
live in ``schemas/prices.json``, each with its source or marked as an assumption; only
sora-2 at 720p is a public figure, and most models have no known price at all. A price
is keyed ``MODEL/RESOLUTION`` (the value of the model's resolution field after the API's
defaults, e.g. ``wan2.7/1080P``, ``kling-v3/pro``) or ``MODEL`` (every job of the model).
A manifest's ``prices:`` block overrides the built-in table, and ``--price KEY=USD``
overrides both. A job whose price is unknown is estimated as **unknown** (None), never
$0: callers show it that way, and ``--budget`` refuses to start it.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError, UsageError
from runner.manifest.catalog import Catalog, ModelSpec, load_catalog
from runner.manifest.schemas import schema_dir
from runner.models import Job

if TYPE_CHECKING:
    from runner.manifest.loader import Manifest

PRICES_FILE = "prices.json"
#: Largest price accepted from a flag, USD per second (matches the schema's maximum).
MAX_PRICE = 100.0


@lru_cache(maxsize=1)
def _built_in() -> tuple[Mapping[str, float | None], Mapping[str, str]]:
    try:
        data: Any = json.loads((schema_dir() / PRICES_FILE).read_text(encoding="utf-8"))
        entries = [(e["key"], e.get("usd_per_second"), e.get("source", "")) for e in data["prices"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"{PRICES_FILE}: the shipped price table is broken ({exc})"
        raise RunnerError(msg) from exc
    prices = {key: None if usd is None else float(usd) for key, usd, _ in entries}
    sources = {key: _label(str(source), usd) for key, usd, source in entries}
    return MappingProxyType(prices), MappingProxyType(sources)


def _label(source: str, usd: object) -> str:
    """A short label for tables: 'public figure', 'assumed' or 'unknown'."""
    if usd is None:
        return "unknown"
    return source.split(":", 1)[0] if ":" in source else source


def built_in_prices() -> Mapping[str, float | None]:
    """The shipped estimates, USD per second by key (None: unknown)."""
    return _built_in()[0]


def built_in_labels() -> Mapping[str, str]:
    """Where each shipped estimate comes from, in a word: public figure, assumed, unknown."""
    return _built_in()[1]


class PriceTable(dict[str, float | None]):
    """USD per second by price key (None: unknown), remembering where each came from."""

    __slots__ = ("sources",)

    def __init__(self, prices: Mapping[str, float | None], sources: Mapping[str, str]) -> None:
        super().__init__(prices)
        self.sources = dict(sources)


def price_keys(job: Job) -> tuple[str, ...]:
    """The keys that may price ``job``, most specific first."""
    resolution = job.effective_resolution
    return (f"{job.model}/{resolution}", job.model) if resolution else (job.model,)


def rate(job: Job, prices: Mapping[str, float | None] | None = None) -> float | None:
    """USD per second for the job (``prices``, else built-in); None when unknown."""
    return rate_and_key(job, prices)[0]


def rate_and_key(
    job: Job, prices: Mapping[str, float | None] | None = None
) -> tuple[float | None, str]:
    """The job's USD per second (None when unknown) and the key that set it."""
    built_in = _built_in()[0]
    for key in price_keys(job):
        for table in (prices or {}, built_in):
            if key in table:
                return table[key], key
    return None, price_keys(job)[0]


def estimate(job: Job, prices: Mapping[str, float | None] | None = None) -> float | None:
    """Estimated USD for one job: rendered seconds x :func:`rate`; None when unknown."""
    usd = rate(job, prices)
    seconds = job.seconds
    if usd is None or seconds is None:
        return None
    return seconds * usd


def merged_prices(
    manifests: Iterable[Manifest], overrides: Mapping[str, float] | None = None
) -> PriceTable:
    """The table a run uses: built-in < the manifests' ``prices:`` < ``--price`` flags.

    Raises:
        UsageError: two manifests set different prices for a key no flag overrides
            (one run has one price table).
    """
    overrides = overrides or {}
    built_in, built_in_labels = _built_in()
    prices: dict[str, float | None] = dict(built_in)
    sources = dict(built_in_labels)
    setters: dict[str, str] = {}
    for manifest in manifests:
        for key, usd in manifest.prices.items():
            if key in setters and prices[key] != usd and key not in overrides:
                msg = (
                    f"{manifest.path}: prices.{key} is {usd}, but {setters[key]} says "
                    f"{prices[key]}\n  hint: agree on one price, or pass --price {key}=USD"
                )
                raise UsageError(msg)
            _drop_built_in_variants(prices, key, setters, overrides)
            prices[key], sources[key], setters[key] = usd, f"from {manifest.path}", manifest.path
    for key, usd in overrides.items():
        _drop_built_in_variants(prices, key, setters, overrides)
        prices[key], sources[key] = usd, "from --price"
    return PriceTable(prices, sources)


def _drop_built_in_variants(
    prices: dict[str, float | None], key: str, *given: Mapping[str, object]
) -> None:
    """A price given for a whole model replaces the built-in ones of its resolutions."""
    if "/" in key:
        return
    for other in [k for k in prices if k.startswith(key + "/")]:
        if not any(other in table for table in given):
            del prices[other]


def key_problem(key: str, catalog: Catalog | None = None) -> str | None:
    """Why ``key`` names no price (a hint to show), or None for a usable key.

    A usable key is a catalog model, alone or with a value its resolution field takes.
    """
    catalog = catalog if catalog is not None else load_catalog()
    model, _, resolution = key.partition("/")
    spec = catalog.get(model)
    if spec is not None and not resolution:
        return None
    if spec is not None and resolution in valid_resolutions(spec):
        return None
    if spec is None:
        close = difflib.get_close_matches(key, [*_built_in()[0], *catalog], n=1, cutoff=0.6)
        if close:
            return f"did you mean '{close[0]}'?"
        return f"no model '{model}' in the catalog ('apimart-batch models' lists them)"
    if "resolution" not in spec.fields:
        return f"{model} has no resolution field: price it as '{model}'"
    keys = [f"{model}/{value}" for value in valid_resolutions(spec)]
    close = difflib.get_close_matches(key, [*_built_in()[0], *keys], n=1, cutoff=0.8)
    also = f"; did you mean '{close[0]}'?" if close else ""
    return f"{model} does not render '{resolution}' (keys: {', '.join(keys)}, or {model}){also}"


def valid_resolutions(spec: ModelSpec) -> list[str]:
    """The values the model's resolution field takes for this model id, as spelled."""
    field = spec.fields.get("resolution")
    if field is None:
        return []
    ok = []
    for value in spec.enum(field):
        body = {"model": spec.id, "prompt": "p", field: value}
        if not any(tuple(e.path)[:1] == (field,) for e in spec.validator.iter_errors(body)):
            ok.append(str(value))
    return ok


def parse_price_override(text: str) -> dict[str, float]:
    """Parse one ``--price KEY=USD`` value into ``{key: usd_per_second}``.

    Raises:
        UsageError: the text is not ``KEY=NUMBER`` with a usable key and a price >= 0.
    """
    key, sep, number = (part.strip() for part in text.partition("="))
    example = "e.g. --price wan2.7/1080P=0.1 (USD per second)"
    if not sep or not key or not number:
        msg = f"--price '{text}': expected MODEL/RESOLUTION=USD or MODEL=USD\n  hint: {example}"
        raise UsageError(msg)
    problem = key_problem(key)
    if problem is not None:
        msg = f"--price '{text}': no such model/resolution '{key}'\n  hint: {problem}"
        raise UsageError(msg)
    try:
        usd = float(number.removeprefix("$"))
    except ValueError:
        usd = math.nan
    if not 0 <= usd <= MAX_PRICE:
        msg = (
            f"--price '{text}': '{number}' is not a price between 0 and {MAX_PRICE:g}"
            f"\n  hint: {example}"
        )
        raise UsageError(msg)
    return {key: usd}
