"""The test double: APIMart's documented contract over aiohttp.web, with faults on demand.

``contract`` holds what the docs say (envelopes, errors, ids, the catalog's validation),
``config`` the knobs and their ``mock-server`` flags, ``faults`` what goes wrong and when,
``tasks`` and ``uploads`` what the emulator keeps, ``routes`` the handlers and ``server``
the application that wires them. The server side of aiohttp loads only when a server is
asked for (``--mock`` or ``mock-server``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.emulator.config import EmulatorConfig, add_arguments, config_from_args

if TYPE_CHECKING:
    from runner.emulator.server import Emulator, RunningEmulator, running, serve_forever

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "RunningEmulator",
    "add_arguments",
    "config_from_args",
    "running",
    "serve_forever",
]
_SERVER = frozenset({"Emulator", "RunningEmulator", "running", "serve_forever"})


def __getattr__(name: str) -> Any:
    if name in _SERVER:
        from runner.emulator import server

        return getattr(server, name)
    msg = f"module 'runner.emulator' has no attribute {name!r}"
    raise AttributeError(msg)
