"""runner.pricing: the estimated price table, its overrides and per-job estimates."""

from __future__ import annotations

import pytest
from jobfactory import make_job

from runner.errors import UsageError
from runner.manifest.loader import Manifest
from runner.manifest.pricing import (
    MAX_PRICE,
    PriceTable,
    built_in_labels,
    built_in_prices,
    estimate,
    key_problem,
    merged_prices,
    parse_price_override,
    rate,
)
from runner.manifest.schemas import load_schema
from runner.models import Job


def job(model: str = "sora-2", duration: int | None = 8, resolution: str | None = None) -> Job:
    return make_job("j", model=model, prompt="p", duration=duration, resolution=resolution)


def manifest(path: str, prices: dict[str, float]) -> Manifest:
    return Manifest(path=path, name=path, jobs=(), prices=prices)


def test_built_in_prices_are_the_documented_assumptions() -> None:
    """sora-2 720p is the public $0.08/s; pro is 3x, 5x and 7x that, marked assumed."""
    assert {k: v for k, v in built_in_prices().items() if k.startswith("sora")} == {
        "sora-2/720p": 0.08,
        "sora-2-pro/720p": 0.24,
        "sora-2-pro/1024p": 0.40,
        "sora-2-pro/1080p": 0.56,
    }
    assert built_in_labels()["sora-2/720p"] == "public figure"
    assert built_in_labels()["sora-2-pro/1080p"] == "assumed"


def test_built_in_keys_are_usable_and_the_schema_agrees() -> None:
    """Every built-in key names a catalog model (and a resolution it renders); same maximum."""
    assert [key for key in built_in_prices() if key_problem(key) is not None] == []
    assert load_schema()["$defs"]["price"]["maximum"] == MAX_PRICE


@pytest.mark.parametrize(
    ("the_job", "usd"),
    [
        pytest.param(job(), 0.64, id="sora-2-8s"),
        pytest.param(job(duration=None), 0.32, id="api-default-4s"),
        pytest.param(job("sora-2-pro", 20, "1080p"), 11.2, id="pro-1080p-20s"),
        pytest.param(job("sora-2-pro", 4, None), 0.96, id="pro-default-720p"),
    ],
)
def test_estimate_is_seconds_times_rate(the_job: Job, usd: float) -> None:
    """A job costs its billed seconds times the rate of its model and resolution."""
    assert estimate(the_job) == pytest.approx(usd)


def test_given_prices_win_and_fall_back_to_built_in() -> None:
    """A partial table overrides only its keys."""
    prices = {"sora-2-pro/1080p": 1.0}
    assert rate(job("sora-2-pro", 8, "1080p"), prices) == 1.0
    assert rate(job(), prices) == 0.08


def test_unknown_model_has_no_price() -> None:
    """A model without a price is estimated as unknown (None), never $0."""
    assert rate(job("sora-3")) is None
    assert estimate(job("sora-3")) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("sora-2-pro/1080p=0.6", {"sora-2-pro/1080p": 0.6}, id="plain"),
        pytest.param(" sora-2/720p = $0.1 ", {"sora-2/720p": 0.1}, id="spaces-and-dollar"),
        pytest.param("sora-2/720p=0", {"sora-2/720p": 0.0}, id="free"),
    ],
)
def test_price_override_parses(text: str, expected: dict[str, float]) -> None:
    """--price MODEL/RESOLUTION=USD gives one price."""
    assert parse_price_override(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("sora-2-pro/1080p", "expected MODEL/RESOLUTION=USD", id="no-equals"),
        pytest.param("=0.5", "expected MODEL/RESOLUTION=USD", id="no-key"),
        pytest.param("sora-2-pro/4k=0.5", "sora-2-pro does not render '4k'", id="bad-resolution"),
        pytest.param("sora-2/1080p=0.5", "did you mean 'sora-2-pro/1080p'?", id="unknown-key"),
        pytest.param("kling=0.5", "did you mean 'kling-v3'?", id="near-model"),
        pytest.param("zzz=0.5", "no model 'zzz' in the catalog", id="far-key"),
        pytest.param("sora-2/720p=cheap", "is not a price between 0 and 100", id="text"),
        pytest.param("sora-2/720p=-1", "is not a price between 0 and 100", id="negative"),
        pytest.param("sora-2/720p=nan", "is not a price between 0 and 100", id="nan"),
        pytest.param("sora-2/720p=inf", "is not a price between 0 and 100", id="inf"),
        pytest.param("sora-2/720p=1000", "is not a price between 0 and 100", id="too-big"),
    ],
)
def test_bad_price_override_is_a_usage_error(text: str, fragment: str) -> None:
    """A bad --price names the flag, the value and the fix."""
    with pytest.raises(UsageError) as caught:
        parse_price_override(text)
    assert f"--price '{text}'" in str(caught.value)
    assert fragment in str(caught.value)


def test_merged_prices_layer_defaults_manifests_and_flags() -> None:
    """built-in < manifest prices: < --price, each labelled with where it came from."""
    table = merged_prices(
        [manifest("a.yaml", {"sora-2/720p": 0.1, "sora-2-pro/720p": 0.3})],
        {"sora-2-pro/720p": 0.5},
    )
    assert isinstance(table, PriceTable)
    assert table["sora-2/720p"] == 0.1
    assert table["sora-2-pro/720p"] == 0.5
    assert table["sora-2-pro/1080p"] == 0.56
    assert table.sources["sora-2/720p"] == "from a.yaml"
    assert table.sources["sora-2-pro/720p"] == "from --price"
    assert table.sources["sora-2-pro/1080p"] == "assumed"


def test_manifests_that_disagree_on_a_price_need_a_flag() -> None:
    """One run has one table: two different manifest prices are refused unless a flag decides."""
    both = [manifest("a.yaml", {"sora-2/720p": 0.1}), manifest("b.yaml", {"sora-2/720p": 0.2})]
    with pytest.raises(UsageError, match=r"b\.yaml: prices\.sora-2/720p is 0\.2, but a\.yaml"):
        merged_prices(both)
    assert merged_prices(both, {"sora-2/720p": 0.3})["sora-2/720p"] == 0.3
    same = [manifest("a.yaml", {"sora-2/720p": 0.1}), manifest("b.yaml", {"sora-2/720p": 0.1})]
    assert merged_prices(same)["sora-2/720p"] == 0.1
