"""Secret scan with server echo: a hostile server puts the Authorization header in its answers.

A tiny aiohttp server (not the emulator, which never echoes) answers each job, by the
first word of its prompt, with an error, a page or a task whose text repeats the caller's
``Authorization`` value. ``run``, ``status`` and ``report`` run against it as
subprocesses; every stdout and stderr, the ledger, the summary JSON, any ``.torn`` or
backup file and every file name must hold neither the key nor a ``Bearer`` token.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from chaoshelpers import SecretScan, chaos_env
from clihelpers import BIN

pytestmark = pytest.mark.slow

def _error(status: int, text: str, **headers: str) -> web.Response:
    body = {"error": {"code": status, "message": text, "type": "echo"}}
    return web.json_response(body, status=status, headers=headers)


def echo_app() -> web.Application:
    """Answers that quote the request's Authorization header back at the client."""
    numbers = itertools.count()
    tasks: dict[str, str] = {}

    async def submit(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        mode = (await request.json())["prompt"].split()[0]
        if mode == "ok" or mode.startswith("poll-"):
            task = f"task_echo{next(numbers)}"
            tasks[task] = mode
            return web.json_response({"code": 200, "data": [{"status": "submitted",
                                                             "task_id": task}]})
        if mode == "html":
            return web.Response(text=f"<html>proxy error for {auth}</html>",
                                content_type="text/html")
        if mode == "text-502":
            return web.Response(status=502, text=f"bad gateway ({auth})")
        if mode == "429":
            return _error(429, f"slow down, {auth}", **{"Retry-After": "0"})
        return _error(int(mode), f"refused for {auth} (Authorization: {auth})")

    async def poll(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        task = request.match_info["task_id"]
        mode = tasks.get(task, "poll-failed")
        if mode == "poll-401":
            return _error(int(mode[-3:]), f"cannot poll with {auth}")
        error = {"code": 500, "message": f"generation failed for {auth}", "type": "echo"}
        data = {"id": task, "status": "failed", "progress": 100, "error": error}
        return web.json_response({"code": 200, "data": data})

    app = web.Application()
    app.add_routes([web.post("/v1/videos/generations", submit),
                    web.get("/v1/tasks/{task_id}", poll)])
    return app


@pytest.fixture
async def echo_server(aiohttp_server: Any) -> str:
    """The echo server on 127.0.0.1 (aiohttp's test server), its base URL."""
    running = await aiohttp_server(echo_app())
    return str(running.make_url("")).rstrip("/")


Run = Callable[..., Awaitable[tuple[int, str, str]]]


def _runner(cwd: Path, scan: SecretScan) -> Run:
    async def run(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            BIN, *args, cwd=cwd, env=chaos_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        text_out, text_err = out.decode(), err.decode()
        scan.process(" ".join(args[:2]), text_out, text_err)
        assert "Traceback" not in text_err, text_err
        assert process.returncode is not None
        return process.returncode, text_out, text_err
    return run


# A poll that fails transiently is retried with real backoff by ``status``: left out here.
#: Answers that end a job, not the run: one manifest holds one job of each.
JOB_MODES = ["500", "400", "422", "429", "503", "html", "text-502", "poll-failed"]
#: Answers that stop the run (key, permission): one manifest each.
FATAL_MODES = ["401", "403", "poll-401"]


def _manifest(folder: Path, modes: list[str]) -> None:
    doc = {"version": 1, "name": "echo", "defaults": {"model": "sora-2", "duration": 4},
           "jobs": [{"id": f"job-{mode}", "prompt": f"{mode} a paper boat"} for mode in modes]}
    (folder / "echo.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")


async def _attack(url: str, folder: Path, *, poll: bool) -> SecretScan:
    """run (text and JSON logs), status if tasks exist, report; then scan the folder."""
    scan = SecretScan()
    run = _runner(folder, scan)
    target = ["--base-url", url]
    for log in ("text", "json"):
        code, _, _ = await run("run", "echo.yaml", *target, "--max-attempts", "1",
                               "--summary-json", f"summary-{log}.json", "--log-format", log)
        assert code in (0, 1, 3)
    if poll:
        code, _, _ = await run("status", "echo.ledger.csv", *target, "--log-format", "json")
        assert code in (0, 1, 3)
    for form in ("table", "json"):
        code, _, _ = await run("report", "echo.ledger.csv", "--format", form)
        assert code == 0
    scan.tree(folder)
    assert scan.files >= 3
    return scan


async def test_echoed_key_in_job_answers_is_nowhere(echo_server: str, tmp_path: Path) -> None:
    """Errors, pages and failed tasks that quote the key: it is in no output, ledger or file."""
    _manifest(tmp_path, JOB_MODES)
    scan = await _attack(echo_server, tmp_path, poll=True)
    assert not scan.leaks, scan.leaks


@pytest.mark.parametrize("mode", FATAL_MODES)
async def test_echoed_key_in_a_refusal_is_nowhere(echo_server: str, tmp_path: Path,
                                                  mode: str) -> None:
    """A refused key or permission, quoted back: the key is in no output, ledger or file."""
    _manifest(tmp_path, [mode])
    scan = await _attack(echo_server, tmp_path, poll=mode.startswith("poll-"))
    assert not scan.leaks, scan.leaks
