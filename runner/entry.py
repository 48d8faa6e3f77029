"""The console script: SIGINT and SIGTERM are handled before anything heavy is imported.

``main`` installs one plain ``signal.signal`` handler for both signals as its first act,
then imports the CLI (aiohttp, jsonschema and yaml take a few hundred ms to load). The
handler stays installed to the end; what a signal does depends on the phase:

* **before any stop-aware phase** (imports, flags, manifests, ledger opening): nothing was
  sent, so the command ends at once with ``Interrupted``; it exits 130 (SIGINT) or 143
  (SIGTERM) and prints one line, never a traceback. Signals while it unwinds are noted
  only: the clean-up (closing the ledger, stopping a --mock emulator) is short;
* **inside a stop-aware phase** (``runtime.interrupts``, see ``routed``): the signal goes to
  that phase, which stops starting work on the first and aborts on the second;
* **after one** (the summary is being written): the first signal waits for the summary,
  then sets the exit code; a second ends the command at once.

Inside a running event loop the signal is acted on from a loop callback, never raised in
whichever task happens to run (asyncio would print that task's "exception was never
retrieved" traceback). The exit code is always decided by the first signal. Once ``main``
has its exit code, both signals are ignored, so interpreter shutdown cannot be cut either.
The only moment no handler of ours can run is interpreter start-up, before this module.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import FrameType

# Only the stdlib's lightest modules: every import here delays the handler.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Exit code when stdout is closed early (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE = 141
Route = Callable[[int], None]


def exit_code(signum: int) -> int:
    """The documented exit code of a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + signum


class Interrupted(SystemExit):
    """A signal ended the command outside a stop-aware phase.

    A ``SystemExit``, so that ``except Exception`` never swallows it, asyncio lets it through
    its callbacks, and even escaping everything it exits quietly with the right code.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(exit_code(signum))
        self.signum = signum


class _State:
    def __init__(self) -> None:
        self.signals: list[int] = []  # every one received, in order
        self.route: Route | None = None  # the stop-aware phase running now, if any
        self.settled = False  # a stop-aware phase has ended: its summary is being written
        self.installed = False  # ``main`` owns the handlers (not so in-process, under tests)
        self.raised = False  # an ``Interrupted`` is on its way out


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _state.signals.append(signum)
    first = len(_state.signals) == 1
    loop = _running_loop()
    if loop is not None:
        try:
            loop.call_soon_threadsafe(_deliver, signum, first)
        except RuntimeError:  # the loop is closing: act here instead
            pass
        else:
            return
    _deliver(signum, first)


def _running_loop() -> AbstractEventLoop | None:
    # asyncio may not be imported yet, or only halfway (a signal during its import).
    events = sys.modules.get("asyncio.events")
    get_running_loop = getattr(events, "_get_running_loop", None)
    loop: AbstractEventLoop | None = get_running_loop() if get_running_loop else None
    return loop


def _deliver(signum: int, first: bool) -> None:
    if _state.route is not None:
        _state.route(signum)
    elif not _state.installed or _state.raised:
        # In-process (tests): a late signal of a phase that has ended. Or the command is
        # already ending: cutting its clean-up short would only leave asyncio's complaints.
        return
    elif not (first and _state.settled):
        _state.raised = True
        raise Interrupted(signum)


@contextmanager
def routed(route: Route) -> Iterator[None]:
    """Within the block, each SIGINT/SIGTERM calls ``route(signum)`` (from the event loop).

    Installs the handler when ``main`` did not (in-process use) and restores the previous
    ones after. On leaving, a first signal no longer ends the command at once: what follows
    a stop-aware phase is its summary, which should be written.
    """
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    outer, _state.route = _state.route, route
    try:
        yield
    finally:
        _state.route = outer
        _state.settled = True
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the apimart-batch CLI with signals handled from start to end; return the exit code."""
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    _state.installed = True
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            from runner.cli import main as cli_main  # the heavy imports, now interruptible

            code = cli_main(args)
        except Interrupted as exc:
            code = exit_code(exc.signum)
            _say(f"apimart-batch: interrupted by {_name(exc.signum)}", args)
        except BrokenPipeError:
            # The reader went away (`... | head`): what was recorded stays recorded; say
            # nothing more on stdout, and exit as a shell reports a SIGPIPE death.
            with suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = EXIT_BROKEN_PIPE
        else:
            if _state.signals and code != exit_code(_state.signals[0]):
                # It came as the summary was written, so the command saw none: say it here.
                _say(f"apimart-batch: interrupted by {_name(_state.signals[0])} as the "
                     "command ended; what it did is recorded", args)
        with suppress(Interrupted, OSError):  # a signal while flushing, or nobody listening
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        # The exit code is decided: nothing may cut the interpreter's shutdown now (its
        # last step restores SIG_DFL, which would end the process by the signal itself).
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    return exit_code(_state.signals[0]) if _state.signals else code


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _say(text: str, args: Sequence[str]) -> None:
    """One line on stderr, as a JSON object under ``--log-format json``."""
    joined = " ".join(args)
    if "--log-format json" in joined or "--log-format=json" in joined:
        import json

        text = json.dumps({"level": "error", "msg": text})
    with suppress(Interrupted, OSError):
        print(text, file=sys.stderr)
