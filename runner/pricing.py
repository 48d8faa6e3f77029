"""Estimated prices: USD per second of video, by model and resolution.

APIMart bills per generated second and publishes no price table. The only public figure
is sora-2 at 720p, about $0.08/s; the sora-2-pro figures below are assumptions (that
figure times 3, 5 and 7, the ratios a reseller with the same schema charges). Every
number this module produces is therefore an **estimate**. Prices are keyed
``MODEL/RESOLUTION``; a manifest's ``prices:`` block overrides the built-in table, and
``--price MODEL/RESOLUTION=USD`` overrides both.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from runner.errors import UsageError
from runner.models import Job

if TYPE_CHECKING:
    from runner.manifest import Manifest

#: Built-in estimates, USD per second (see the module docstring for their sources).
DEFAULT_PRICES: Mapping[str, float] = MappingProxyType(
    {
        "sora-2/720p": 0.08,
        "sora-2-pro/720p": 0.24,
        "sora-2-pro/1024p": 0.40,
        "sora-2-pro/1080p": 0.56,
    }
)
#: Where each built-in price comes from, for labels.
DEFAULT_SOURCES: Mapping[str, str] = MappingProxyType(
    {key: "assumed" for key in DEFAULT_PRICES} | {"sora-2/720p": "public figure"}
)
#: Largest price accepted from a flag, USD per second (matches the schema's maximum).
MAX_PRICE = 100.0


class PriceTable(dict[str, float]):
    """USD per second by ``MODEL/RESOLUTION``, remembering where each price came from."""

    __slots__ = ("sources",)

    def __init__(self, prices: Mapping[str, float], sources: Mapping[str, str]) -> None:
        super().__init__(prices)
        self.sources = dict(sources)


def price_key(model: str, resolution: str) -> str:
    """The key of a price: ``MODEL/RESOLUTION``, e.g. ``sora-2-pro/1080p``."""
    return f"{model}/{resolution}"


def rate(job: Job, prices: Mapping[str, float] = DEFAULT_PRICES) -> float:
    """USD per second for the job's model and resolution (``prices``, else built-in).

    Raises:
        KeyError: no price is known for the job's model and resolution.
    """
    key = price_key(job.model, job.effective_resolution)
    usd = prices.get(key, DEFAULT_PRICES.get(key))
    if usd is None:
        raise KeyError(key)
    return usd


def estimate(job: Job, prices: Mapping[str, float] = DEFAULT_PRICES) -> float:
    """Estimated USD for one job: billed seconds x :func:`rate`.

    Raises:
        KeyError: no price is known for the job's model and resolution.
    """
    return job.seconds * rate(job, prices)


def merged_prices(
    manifests: Iterable[Manifest], overrides: Mapping[str, float] | None = None
) -> PriceTable:
    """The table a run uses: built-in < the manifests' ``prices:`` < ``--price`` flags.

    Raises:
        UsageError: two manifests set different prices for a key no flag overrides
            (one run has one price table).
    """
    overrides = overrides or {}
    prices, sources = dict(DEFAULT_PRICES), dict(DEFAULT_SOURCES)
    setters: dict[str, str] = {}
    for manifest in manifests:
        for key, usd in manifest.prices.items():
            if key in setters and prices[key] != usd and key not in overrides:
                msg = (
                    f"{manifest.path}: prices.{key} is {usd}, but {setters[key]} says "
                    f"{prices[key]}\n  hint: agree on one price, or pass --price {key}=USD"
                )
                raise UsageError(msg)
            prices[key], sources[key], setters[key] = usd, f"from {manifest.path}", manifest.path
    for key, usd in overrides.items():
        prices[key], sources[key] = usd, "from --price"
    return PriceTable(prices, sources)


def parse_price_override(text: str) -> dict[str, float]:
    """Parse one ``--price MODEL/RESOLUTION=USD`` value into ``{key: usd_per_second}``.

    Raises:
        UsageError: the text is not ``KEY=NUMBER`` with a known key and a price >= 0.
    """
    key, sep, number = (part.strip() for part in text.partition("="))
    example = "e.g. --price sora-2-pro/1080p=0.6 (USD per second)"
    if not sep or not key or not number:
        msg = f"--price '{text}': expected MODEL/RESOLUTION=USD\n  hint: {example}"
        raise UsageError(msg)
    if key not in DEFAULT_PRICES:
        close = difflib.get_close_matches(key, list(DEFAULT_PRICES), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(DEFAULT_PRICES)}"
        msg = f"--price '{text}': no such model/resolution '{key}'\n  hint: {hint}"
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
