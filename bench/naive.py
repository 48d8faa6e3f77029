"""The naive baseline: the short client a user would write instead of apimart-batch.

aiohttp, a semaphore of ``-j`` (and a connection pool as large), ``yaml.safe_load`` and a csv
writer; a 429 waits ``Retry-After`` (else 1 s) and tries again. Nothing else: no row before
the POST, no resume, no Idempotency-Key, no validation, no fsync. Kept to about 30 lines of
logic so the comparison is with what people actually write.
Usage: ``python bench/naive.py MANIFEST OUT.csv --base-url URL -j N`` (key in APIMART_API_KEY).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
from typing import Any

import aiohttp
import yaml


async def submit_all(jobs: list[dict[str, Any]], writer: Any, base_url: str, c: int) -> int:
    """POST every job, ``c`` at a time; write a job_id,task_id row as each is answered."""
    headers = {"Authorization": f"Bearer {os.environ['APIMART_API_KEY']}"}
    limit = asyncio.Semaphore(c)
    failed = 0
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

        async def submit(job: dict[str, Any]) -> None:
            nonlocal failed
            body = {k: v for k, v in job.items() if k != "id"}
            async with limit:
                while True:
                    url = f"{base_url}/v1/videos/generations"
                    async with session.post(url, json=body) as resp:
                        answer = await resp.json(content_type=None)
                        if resp.status != 429:
                            break
                        wait = float(resp.headers.get("Retry-After", 1))
                    await asyncio.sleep(wait)
            data = answer.get("data") if resp.status == 200 else None
            task_id = data[0]["task_id"] if data else ""
            failed += not task_id
            writer.writerow([job.get("id", ""), task_id, resp.status])

        await asyncio.gather(*(submit(job) for job in jobs))
    return 1 if failed else 0


def main() -> int:
    """Read the manifest, then submit every job and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("-j", type=int, default=8)
    args = parser.parse_args()
    with open(args.manifest, encoding="utf-8") as f:  # noqa: PTH123 - the naive way
        doc = yaml.safe_load(f)
    defaults = doc.get("defaults") or {}
    jobs = [{**defaults, **job} for job in doc["jobs"]]
    with open(args.out, "w", newline="", encoding="utf-8") as f:  # noqa: PTH123
        writer = csv.writer(f)
        writer.writerow(["job_id", "task_id", "http_status"])
        return asyncio.run(submit_all(jobs, writer, args.base_url, args.j))


if __name__ == "__main__":
    raise SystemExit(main())
