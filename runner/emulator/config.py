"""The emulator's knobs: ``EmulatorConfig`` and its command-line flags (``mock-server``)."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from runner.errors import UsageError


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How the emulator behaves; each knob is also a ``mock-server`` flag (see ``HELP``).

    The submit fault probabilities (``p_429`` ... ``p_html_200``) are exclusive outcomes of
    one draw per request, so they must sum to at most 1. Out-of-range values raise ValueError.
    """

    key: str | None = None
    latency_ms: float = 0.0
    latency_jitter: float = 0.5
    task_seconds: float = 3.0
    fail_rate: float = 0.0
    fail_reason_field: bool = False
    url_as_string: bool = False
    link_ttl: int = 86400
    fresh_links: bool = False
    legacy_values: bool = False
    idempotency: bool = True
    p_429: float = 0.0
    retry_after: str | None = None
    retry_after_body: float | None = None
    rate_limit_rps: float | None = None
    rate_limit_scope: Literal["submit", "api"] = "submit"
    p_500: float = 0.0
    p_502: float = 0.0
    p_503: float = 0.0
    p_504: float = 0.0
    p_reset_after_create: float = 0.0
    p_slow_after_create: float = 0.0
    slow_seconds: float = 30.0
    p_html_200: float = 0.0
    quota: int | None = None
    quota_status: int = 402
    balance_usd: float | None = None
    balance_fails: bool = False
    p_poll_error: float = 0.0
    p_download_reset: float = 0.0
    adopt_tasks: bool = False
    retired_models: frozenset[str] = frozenset()
    unavailable_status: int = 503
    catalog_dir: Path | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.retired_models, str):
            msg = f"'retired_models' must be a set of model ids (got {self.retired_models!r})"
            raise ValueError(msg)
        # Frozen: a list or set given by a caller still makes a hashable config.
        object.__setattr__(self, "retired_models", frozenset(self.retired_models))
        for name in ("fail_rate", *(f.name for f in fields(self) if f.name.startswith("p_"))):
            if not 0.0 <= getattr(self, name) <= 1.0:
                msg = f"{name!r} must be between 0 and 1 (got {getattr(self, name)})"
                raise ValueError(msg)
        for name in ("latency_ms", "latency_jitter", "task_seconds", "slow_seconds", "link_ttl"):
            if getattr(self, name) < 0:
                msg = f"{name!r} must be >= 0 (got {getattr(self, name)})"
                raise ValueError(msg)
        if sum(p for _, p in self.submit_faults) > 1.0:
            msg = "the submit fault probabilities (p_429 ... p_html_200) must sum to <= 1"
            raise ValueError(msg)
        if self.quota_status not in (402, 403):
            msg = f"'quota_status' must be 402 or 403 (got {self.quota_status})"
            raise ValueError(msg)
        if self.unavailable_status not in (503, 404):
            msg = f"'unavailable_status' must be 503 or 404 (got {self.unavailable_status})"
            raise ValueError(msg)
        if self.catalog_dir is not None:
            object.__setattr__(self, "catalog_dir", Path(self.catalog_dir))
            if not self.catalog_dir.is_dir():
                msg = f"'catalog_dir' must be a folder of model schemas (got {self.catalog_dir})"
                raise ValueError(msg)
        if self.rate_limit_rps is not None and self.rate_limit_rps <= 0:
            msg = f"'rate_limit_rps' must be > 0 (got {self.rate_limit_rps})"
            raise ValueError(msg)
        if self.rate_limit_scope not in ("submit", "api"):
            msg = f"'rate_limit_scope' must be 'submit' or 'api' (got {self.rate_limit_scope!r})"
            raise ValueError(msg)
        if self.quota is not None and self.quota < 0:
            msg = f"'quota' must be >= 0 (got {self.quota})"
            raise ValueError(msg)
        usd = self.balance_usd
        if usd is not None and not (math.isfinite(usd) and usd >= 0):
            msg = f"'balance_usd' must be a finite number >= 0 (got {usd})"
            raise ValueError(msg)

    @property
    def submit_faults(self) -> tuple[tuple[str, float], ...]:
        """The probabilistic submit faults as (action, probability), drawn in this order."""
        return (
            ("429", self.p_429),
            ("500", self.p_500),
            ("502", self.p_502),
            ("503", self.p_503),
            ("504", self.p_504),
            ("reset_after_create", self.p_reset_after_create),
            ("slow_after_create", self.p_slow_after_create),
            ("html_200", self.p_html_200),
        )


#: The documented, fault-free behaviour.
DEFAULT_CONFIG = EmulatorConfig()

# -- command line ------------------------------------------------------------------------------

#: Help text of each ``EmulatorConfig`` knob; ``add_arguments`` makes one flag per entry.
HELP: dict[str, str] = {
    "key": "required Bearer key (default: accept any non-empty key)",
    "latency_ms": "median added latency of each API request, in milliseconds",
    "latency_jitter": "spread (lognormal sigma) of the added latency; 0 = constant",
    "task_seconds": "seconds from submit to the task's end (pending for the first 10%%)",
    "fail_rate": "fraction of tasks that end 'failed'",
    "fail_reason_field": "failed tasks carry 'fail_reason' instead of 'error'",
    "url_as_string": "result.videos[].url is a string, not a list (old doc revision)",
    "link_ttl": "seconds a video link stays valid after completion",
    "fresh_links": "a task query after a video link expired hands out a new link, valid "
    "for --link-ttl from then; the old one stays expired. ASSUMPTION: the docs do not say "
    "whether APIMart re-issues links",
    "legacy_values": "also accept the older durations 10/15 (sora-2) and 10/15/25 (pro)",
    "idempotency": "honour Idempotency-Key (--no-idempotency: ignore it, like an old gateway)",
    "p_429": "probability that a submit is refused with 429",
    "retry_after": "Retry-After header value on 429 answers (default: no header)",
    "retry_after_body": "seconds put in a top-level 'retry_after' field of 429 bodies",
    "rate_limit_rps": "requests per second allowed before 429 (token bucket)",
    "rate_limit_scope": "what the rate limit counts: submits only, or every /v1 request",
    "p_500": "probability that a submit creates the task, then answers 500",
    "p_502": "probability that a submit creates the task, then answers 502",
    "p_503": "probability that a submit is refused with 503",
    "p_504": "probability that a submit creates the task, then answers 504",
    "p_reset_after_create": "probability that a submit creates the task, then drops the connection",
    "p_slow_after_create": "probability that a submit creates the task, then answers late",
    "slow_seconds": "how late a slow submit answers, in seconds",
    "p_html_200": "probability that a submit creates the task, then answers 200 with HTML",
    "quota": "tasks that may be created before submits are refused (default: unlimited)",
    "quota_status": "refusal once the quota is used: 402, or 403 insufficient_user_quota",
    "balance_usd": "/v1/balance reports this many USD less the cost of the tasks created "
    "(reporting only: --quota refuses submits; default: the quota, counted in tasks)",
    "balance_fails": "/v1/balance answers the documented failure: HTTP 200, success false",
    "p_poll_error": "probability that a task query answers 500, 502 or 429",
    "p_download_reset": "probability that a video download stops halfway and drops",
    "adopt_tasks": "answer for well-formed task ids of an earlier emulator process (as sora-2 "
    "720p 4 s tasks created at the id's ULID time), so --mock ledgers outlive their run",
    "retired_models": "model id whose submits get the model-unavailable answer, as a model "
    "not in the catalog does; nothing is created (repeatable). ASSUMPTION: APIMart's real "
    "answer is unknown; see --unavailable-status",
    "unavailable_status": "how a retired or uncatalogued model is refused (both assumed, both "
    "with error.code model_not_found): 503 new-api 'no available channel', or 404 "
    "OpenAI-style 'model does not exist'",
    "catalog_dir": "folder of model schemas that submits are validated against "
    "(default: the shipped catalog)",
    "seed": "random seed, for reproducible ids, latencies and faults",
}
_CHOICES: dict[str, tuple[Any, ...]] = {
    "rate_limit_scope": ("submit", "api"),
    "quota_status": (402, 403),
    "unavailable_status": (503, 404),
}
#: Flags not named after their knob: a repeatable flag takes one value each time.
_FLAG_NAMES = {"retired_models": "retire-model", "balance_usd": "balance"}
_METAVARS = {"float": "X", "int": "N", "Path": "DIR", "frozenset[str]": "ID"}
#: Metavars that say more than the knob's type.
_KNOB_METAVARS = {"balance_usd": "USD"}
_DEST = "emulator_"


def flag_name(knob: str, prefix: str = "") -> str:
    """The command-line flag of an ``EmulatorConfig`` knob, e.g. ``--retire-model``."""
    return "--" + prefix + _FLAG_NAMES.get(knob, knob.replace("_", "-"))


def add_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """Add one ``--{prefix}knob`` flag per ``EmulatorConfig`` knob (dest ``emulator_<knob>``)."""
    group = parser.add_argument_group("emulator")
    for f in fields(EmulatorConfig):
        flag = flag_name(f.name, prefix)
        dest = _DEST + f.name
        default = f.default if f.default is not MISSING else None
        shown = default not in (None, False, frozenset())  # zero, off and unset need no mention
        help_text = HELP[f.name] + (" (default: %(default)s)" if shown else "")
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction
            group.add_argument(flag, dest=dest, default=default, help=help_text, action=action)
            continue
        kind = str(f.type).split(" | ")[0]
        metavar = _KNOB_METAVARS.get(f.name) or _METAVARS.get(kind, "TEXT")
        if isinstance(default, frozenset):
            group.add_argument(flag, dest=dest, action="append", help=help_text, metavar=metavar)
            continue
        choices = _CHOICES.get(f.name)
        convert = type(choices[0]) if choices else {"float": float, "int": int, "Path": Path}.get(
            kind, str
        )
        group.add_argument(
            flag,
            dest=dest,
            type=convert,
            default=default,
            choices=choices,
            help=help_text,
            metavar=None if choices else metavar,
        )


def config_from_args(ns: argparse.Namespace) -> EmulatorConfig:
    """Build the config from flags added by ``add_arguments``; bad values raise UsageError."""
    knobs = {f.name: getattr(ns, _DEST + f.name) for f in fields(EmulatorConfig)}
    knobs["retired_models"] = frozenset(knobs["retired_models"] or ())
    try:
        return EmulatorConfig(**knobs)
    except ValueError as exc:
        msg = f"mock server: {exc}\n  hint: each knob is a --flag of the same name; see --help"
        raise UsageError(msg) from exc
