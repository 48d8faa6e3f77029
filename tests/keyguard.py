"""One check that an API key never shows in an exception, for the client suites."""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable

import pytest

from runner.errors import ApiError


def key_guards(
    key: str,
) -> tuple[Callable[[BaseException], None], Callable[..., Awaitable[ApiError]]]:
    """``assert_no_key(exc)`` and ``await expect(cls, call)`` for a suite whose key is ``key``."""

    def assert_no_key(exc: BaseException) -> None:
        """Fail if the key shows in ``exc``: str, repr, args, the chain or the traceback."""
        texts = ["".join(traceback.format_exception(exc))]
        link: BaseException | None = exc
        while link is not None:
            texts += [str(link), repr(link), repr(link.args)]
            link = link.__cause__ or link.__context__
        leaked = [text for text in texts if key in text]
        assert not leaked, f"the API key leaked into an exception: {leaked[0][:300]}"

    async def expect(cls: type[ApiError], call: Awaitable[object]) -> ApiError:
        """Await ``call``; it must raise exactly ``cls`` (no subclass, no sibling), keyless."""
        with pytest.raises(ApiError) as info:
            await call
        exc = info.value
        assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
        assert_no_key(exc)
        return exc

    return assert_no_key, expect
