"""Shared fixtures: a loopback-only network guard, a fake clock, the emulator and a session."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

# The subprocess fixtures (a mock-server process, spawned commands) live with their helpers.
from clihelpers import mock_server, spawn  # noqa: F401

from runner.emulator.server import EmulatorConfig, RunningEmulator, running

#: The fake clock starts at the doc example's ``created`` (2025-11-11), a realistic epoch.
START = 1_762_853_430.0

EmulatorFactory = Callable[..., Awaitable[RunningEmulator]]


class FakeClock:
    """A unix clock that only moves when told: call it for the time, ``advance`` to move it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds


def _local(host: object) -> bool:
    if host is None or host in ("localhost", b"localhost", "", b""):
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse, and fail the test for, any connection or name lookup beyond loopback."""
    attempts: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def refuse(target: object) -> OSError:
        attempts.append(target)
        return ConnectionRefusedError(f"test network guard: {target!r} is not loopback")

    def allowed(sock: socket.socket, address: Any) -> bool:
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        wildcard = ("0.0.0.0", "::")  # noqa: S104 - a connect target here, never a bind
        return not inet or (_local(address[0]) and address[0] not in wildcard)

    def connect(sock: socket.socket, address: Any) -> None:
        if not allowed(sock, address):
            raise refuse(address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        if not allowed(sock, address):
            raise refuse(address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _local(host):
            raise refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not attempts, f"a test tried to leave loopback: {attempts}"


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock frozen at ``START``; the emulator fixture uses it unless told otherwise."""
    return FakeClock()


@pytest.fixture
async def emulator(fake_clock: FakeClock) -> AsyncIterator[EmulatorFactory]:
    """Start emulators on 127.0.0.1:0: ``await emulator(p_503=1.0)``; all stop at teardown.

    Takes an ``EmulatorConfig`` and/or its knobs as keywords, and ``clock=`` (default: the
    ``fake_clock`` fixture, so tasks only progress when a test advances it).
    """
    async with AsyncExitStack() as stack:

        async def start(
            config: EmulatorConfig | None = None,
            *,
            clock: Callable[[], float] | None = None,
            **knobs: Any,
        ) -> RunningEmulator:
            config = replace(config or EmulatorConfig(), **knobs)
            return await stack.enter_async_context(running(config, clock=clock or fake_clock))

        yield start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session, closed at teardown."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Open ``Client``s holding the test module's ``KEY``: ``await connect(base_url, **options)``.

    ``key=`` overrides the key; every client is closed after the test.
    """
    from runner.api import Client, Secret

    async with AsyncExitStack() as stack:

        async def open_client(base_url: str, key: str | None = None, **options: Any) -> Any:
            secret = Secret(key if key is not None else request.module.KEY)
            return await stack.enter_async_context(Client(base_url, secret, **options))

        yield open_client


@pytest.fixture
def no_key_in_logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Capture every log record at DEBUG (aiohttp's too); fail if one shows the module's KEY."""
    key = request.module.KEY
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield
    leaked = [r for r in caplog.records if key in r.getMessage() or key in (r.exc_text or "")]
    assert key not in caplog.text
    assert not leaked, f"the API key leaked into a log record: {leaked[0].getMessage()[:300]}"
