"""A large -j costs nothing up front: workers, pools and connections never exceed the jobs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from test_media import ledger_of, prompts, statuses
from test_money_paths import run

from runner.engine import lifecycle, schedule
from runner.engine.schedule import run_pool


@pytest.fixture(autouse=True)
def _real_epoch(fake_clock: Any) -> None:
    """Start the emulator's frozen clock at the real time (links are judged by time.time)."""
    fake_clock.now = time.time()


async def test_run_pool_starts_no_more_workers_than_items():
    """run_pool with 512 workers and 5 items runs 5 worker tasks, not 512."""
    seen: list[int] = []

    async def work(item: int) -> None:
        seen.append(len(asyncio.all_tasks()))
        await asyncio.sleep(0)

    await run_pool(range(5), work, workers=512, stop=asyncio.Event())
    assert len(seen) == 5
    assert max(seen) <= 5 + 1  # the workers and this test's own task


async def test_j_512_with_5_jobs_makes_at_most_5_workers(emulator, tmp_path, monkeypatch):
    """run --wait -j 512 on 5 jobs: 5 media workers, and far fewer tasks than -j slots."""
    srv = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 5)
    media: list[int] = []
    peak = [0]
    original_pool, original_run = schedule.run_pool, lifecycle.Media.run

    async def spy_pool(items: Any, work: Any, *, workers: int, **kw: Any) -> None:
        async def sampled(item: Any) -> None:
            peak[0] = max(peak[0], len(asyncio.all_tasks()))
            await work(item)

        await original_pool(items, sampled, workers=workers, **kw)

    async def spy_run(self: lifecycle.Media) -> None:
        media.append(self.workers)
        await original_run(self)

    monkeypatch.setattr("runner.app.run_pool", spy_pool)
    monkeypatch.setattr(lifecycle.Media, "run", spy_run)
    assert await run(srv, manifest, concurrency=512, out=str(tmp_path / "videos")) == 0
    assert sorted(statuses(ledger_of(manifest)).values()) == ["downloaded"] * 5
    assert media == [5]
    assert 0 < peak[0] < 100  # 512 workers per stage would be over 1000 tasks
