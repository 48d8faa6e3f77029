"""What every network command shares: the API target (real or emulated) and signals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager

from runner import entry
from runner.api import Secret
from runner.console import Console
from runner.errors import RunnerError

#: Allocations between two collections of the youngest generation while jobs are sent.
BUSY_GC_THRESHOLD = 10_000
#: Task length of the built-in emulator under --mock: long enough to show polling.
MOCK_TASK_SECONDS = 3.0
MOCK_KEY = Secret("mock-key-not-a-secret")


async def connect(
    stack: AsyncExitStack,
    *,
    mock: bool,
    config_key: Secret | None,
    base_url: str,
    console: Console,
) -> tuple[str, Secret]:
    """The base URL and key to use; with ``mock``, start the emulator in this process."""
    if not mock:
        assert config_key is not None  # the CLI refuses a real run without a key
        return base_url, config_key
    from runner import emulator  # aiohttp.web loads only when a command asks for --mock

    running = await stack.enter_async_context(
        emulator.running(
            emulator.EmulatorConfig(task_seconds=MOCK_TASK_SECONDS, adopt_tasks=True)
        )
    )
    console.info(f"--mock: using the built-in APIMart emulator at {running.base_url}; "
                 "nothing real is sent and nothing is billed")
    return running.base_url, MOCK_KEY


@contextmanager
def fewer_collections(threshold: int = BUSY_GC_THRESHOLD) -> Iterator[None]:
    """Run the block with the cyclic collector's youngest generation collected every
    ``threshold`` allocations instead of CPython's 700; restored after.

    Each request allocates a few hundred short-lived objects that refcounting frees: at the
    default, a 5,000-job run at -j 256 made about 100 collections, which found nothing to
    free and cost about 6 % of the submit phase's CPU. A collector that is off stays off.
    """
    old = gc.get_threshold()
    if old[0]:
        gc.set_threshold(max(old[0], threshold), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


@asynccontextmanager
async def interrupts(stop: asyncio.Event) -> AsyncIterator[list[int]]:
    """First SIGINT/SIGTERM: set ``stop`` (start nothing new); a second of either: cancel now.

    Yields the list of signals caught; the first decides the exit code (130 or 143). The
    cancellation of a second signal ends at this block, so the caller still records what it
    can and exits. Before and after the block, ``runner.entry`` handles the signals: the
    handler is one plain ``signal.signal`` handler throughout, never reset to the default
    in between, so no signal is lost or fatal while the phases hand over.
    """
    loop = asyncio.get_running_loop()
    caught: list[int] = []
    task = asyncio.current_task()
    aborted = False

    def handle(signum: int) -> None:
        nonlocal aborted
        if caught and task is not None and not aborted:
            aborted = True
            task.cancel()
        caught.append(signum)
        stop.set()

    with entry.routed(handle), _wakeup(loop):
        try:
            yield caught
        except asyncio.CancelledError:
            if not aborted or task is None or task.uncancel() > 0:
                raise


@contextmanager
def _wakeup(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Wake the loop when a signal lands on another thread (a DNS or file worker).

    Python runs signal handlers in the main thread only, between two instructions: without
    a wakeup fd, a main thread asleep in ``select`` would not run it until its next event.
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    try:
        old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread: no signal handler runs in this loop's thread
        old = -1
        ours = False
    else:
        ours = old == -1
        if not ours:  # another wakeup fd (an asyncio signal handler) already wakes the loop
            signal.set_wakeup_fd(old)
    try:
        if ours:
            loop.add_reader(reader.fileno(), _drain, reader)
        yield
    finally:
        if ours:
            signal.set_wakeup_fd(old)
            loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


def _drain(reader: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while reader.recv(4096):
            pass


def merged_error(errors: BaseException | Sequence[BaseException]) -> RunnerError:
    """One error for (groups of) errors, every message kept once: each may name a task id."""
    found: list[RunnerError] = []
    for error in errors if isinstance(errors, Sequence) else [errors]:
        found += [e for e in _leaves(error) if isinstance(e, RunnerError) and e not in found]
    if len(found) == 1:
        return found[0]
    text = "\n".join(str(e) for e in found)
    kind = type(found[0]) if all(type(e) is type(found[0]) for e in found) else RunnerError
    try:
        merged = kind(text)
    except TypeError:  # a class with its own constructor (LedgerLockedError)
        merged = RunnerError(text)
    merged.exit_code = found[0].exit_code
    return merged


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error
