"""Manifests of any catalog model: errors, local images in every field, runs, resume, upgrades.

The run tests drive ``runner.app.run`` in process against the emulator over loopback; the
emulator validates every body with the same catalog schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from jobfactory import make_job

from runner import app
from runner.api.client import Client, Secret
from runner.api.retry import RetryPolicy
from runner.app import RunConfig
from runner.console import Console
from runner.engine.poll import Poller, PollTiming
from runner.engine.schedule import Limiter
from runner.engine.submit import Submitter
from runner.errors import ManifestError
from runner.ledger.store import open_ledger, read_latest
from runner.manifest.loader import load_manifests
from runner.manifest.pricing import merged_prices
from runner.report.plan import plan_json, render_plan

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "v0.1"
KEY = "sk-live-MODELS-must-never-be-printed-0707"
NO_WAIT = RetryPolicy(attempts=3, wait_initial=0.0, wait_max=0.0)


def png(shade: int = 90) -> bytes:
    """A tiny valid PNG."""
    raw = b"".join(b"\0" + bytes((shade, 40, 200)) * 4 for _ in range(4))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def refused(path: str, **options: Any) -> str:
    """Every diagnostic the loader gives for ``path`` (it must refuse it)."""
    with pytest.raises(ManifestError) as caught:
        load_manifests([path], **options)
    return str(caught.value)


# -- errors, as good for every model as for Sora ---------------------------------------------


def test_a_wrong_value_names_file_line_field_model_and_the_allowed_values(tmp_path: Path) -> None:
    """The issue's own example: a size Wan 2.7 does not take."""
    path = write(tmp_path, "version: 1\ndefaults: {model: wan2.7}\njobs:\n"
                 "  - {prompt: a}\n  - {prompt: b}\n  - {prompt: c}\n"
                 "  - prompt: d\n    size: '21:9'\n")  # fmt: skip
    assert (f"{path}:8:11: jobs[3].size: '21:9' is not allowed for model wan2.7 "
            "(allowed: 16:9, 9:16, 1:1, 4:3, 3:4)") in refused(path)  # fmt: skip


@pytest.mark.parametrize(
    ("model", "key", "hint"),
    [
        pytest.param("wan2.7", "aspect_ratio", "wan2.7 calls it 'size'", id="wan-size"),
        pytest.param("sora-2", "size", "sora-2 calls it 'aspect_ratio'", id="sora-aspect"),
        pytest.param("kling-v3", "resolution", "kling-v3 calls it 'mode'", id="kling-mode"),
        pytest.param("grok-imagine-1.0-video-apimart", "resolution",
                     "grok-imagine-1.0-video-apimart calls it 'quality'", id="grok-quality"),
        pytest.param("sora-2", "image_with_roles", "sora-2 calls it 'image_urls'", id="roles"),
    ],
)
def test_another_models_field_name_says_what_this_model_calls_it(
    tmp_path: Path, model: str, key: str, hint: str
) -> None:
    """Did-you-mean across models: the key is unknown, and the hint names the right one."""
    path = write(tmp_path, f"version: 1\njobs:\n  - model: {model}\n    prompt: a\n"
                 f"    {key}: x\n")  # fmt: skip
    text = refused(path)
    assert f"{path}:5:5: jobs[0].{key}: unknown key '{key}'" in text
    assert f"hint: {hint}" in text


def test_a_field_only_other_models_take_is_named_as_theirs(tmp_path: Path) -> None:
    """A key no alias explains says which models have it."""
    path = write(tmp_path, "version: 1\njobs:\n  - {model: sora-2, prompt: a, camerafixed: true}\n")
    assert "'camerafixed' is a field of doubao-seedance-1-5-pro, not of sora-2" in refused(path)


def test_every_problem_of_every_model_is_reported_in_one_pass(tmp_path: Path) -> None:
    """Three models, three different mistakes: all three in one refusal, nothing loaded."""
    path = write(tmp_path, "version: 1\njobs:\n"
                 "  - {model: wan2.7, prompt: a, resolution: 720p}\n"
                 "  - {model: kling-v3, prompt: b, mode: ultra}\n"
                 "  - {model: veo3.1-fast, prompt: c, duration: 6}\n")  # fmt: skip
    text = refused(path)
    assert "jobs[0].resolution: '720p' is not allowed for model wan2.7" in text
    assert "did you mean '720P'?" in text
    assert "jobs[1].mode: 'ultra' is not allowed for model kling-v3" in text
    assert "jobs[2].duration:" in text and "for model veo3.1-fast" in text


def test_a_model_outside_the_catalog_names_the_nearest(tmp_path: Path) -> None:
    """A typo in a model id: refused, with the nearest catalog ids."""
    path = write(tmp_path, "version: 1\njobs:\n  - {model: wan-2.7, prompt: a}\n")
    text = refused(path)
    assert "model 'wan-2.7' is not in the catalog" in text
    assert "did you mean 'wan2.7'" in text


def test_unknown_models_allowed_pass_every_field_through(tmp_path: Path) -> None:
    """`unknown_models: allow` (or the flag): model and prompt checked, the rest as written."""
    text = "jobs:\n  - {model: acme-9, prompt: a, weird_field: [1, {x: y}], mode: turbo}\n"
    flagged = write(tmp_path, "version: 1\n" + text, "flag.yaml")
    (manifest,) = load_manifests([flagged], allow_unknown_models=True)
    in_file = write(tmp_path, "version: 1\nunknown_models: allow\n" + text, "file.yaml")
    (again,) = load_manifests([in_file])
    for job in (manifest.jobs[0], again.jobs[0]):
        assert job.body() == {"model": "acme-9", "prompt": "a", "weird_field": [1, {"x": "y"}],
                              "mode": "turbo"}  # fmt: skip
        assert not job.catalogued
    assert "acme-9!" in render_plan([manifest], merged_prices([manifest]))
    blank = write(tmp_path, "version: 1\nunknown_models: allow\njobs:\n  - {model: acme-9, "
                  "prompt: ' '}\n", "blank.yaml")  # fmt: skip
    assert "jobs[0].prompt: must not be blank" in refused(blank)


# -- any field, matrix and defaults, identity ------------------------------------------------


def test_matrix_and_defaults_work_for_any_field(tmp_path: Path) -> None:
    """A matrix over Wan's `size` and a default `negative_prompt` reach every body."""
    path = write(tmp_path, "version: 1\ndefaults: {model: wan2.7, negative_prompt: blur}\n"
                 "jobs:\n  - id: w\n    prompt: a\n    matrix: {size: ['16:9', '9:16', '1:1']}\n")
    (manifest,) = load_manifests([path])
    assert [job.body()["size"] for job in manifest.jobs] == ["16:9", "9:16", "1:1"]
    assert {job.body()["negative_prompt"] for job in manifest.jobs} == {"blur"}


def test_the_fingerprint_covers_every_field(tmp_path: Path) -> None:
    """Editing a model-specific field changes the fingerprint and the Idempotency-Key."""
    base = "version: 1\njobs:\n  - {id: w, model: wan2.7, prompt: a, seed: %d}\n"
    one = load_manifests([write(tmp_path, base % 1, "a.yaml")])[0].jobs[0]
    two = load_manifests([write(tmp_path, base % 2, "b.yaml")])[0].jobs[0]
    assert one.fingerprint != two.fingerprint
    assert one.idempotency_key != two.idempotency_key


def test_jobs_differing_only_in_prompt_share_a_verdict_but_keep_their_errors(
    tmp_path: Path,
) -> None:
    """One over-long prompt in a matrix of 200: exactly that job is refused, with its length."""
    prompts = [f"'prompt {i}'" for i in range(199)] + ["'" + "x" * 2001 + "'"]
    path = write(tmp_path, "version: 1\njobs:\n  - id: h\n    model: MiniMax-Hailuo-2.3\n"
                 f"    matrix: {{prompt: [{', '.join(prompts)}]}}\n")  # fmt: skip
    text = refused(path)
    assert text.count("characters long") == 1
    assert "jobs[0].matrix.prompt[199]: is 2001 characters long; at most 2000" in text


# -- local files in every kind of image field ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "field", "pointer"),
    [
        pytest.param("doubao-seedance-2.0", "image_urls: [./a.png, ./b.png]",
                     ("image_urls", 1), id="list-item"),
        pytest.param("MiniMax-Hailuo-2.3", "first_frame_image: ./b.png",
                     ("first_frame_image",), id="single-field"),
        pytest.param("wan2.7", "image_with_roles: [{url: ./a.png, role: first_frame}, "
                     "{url: ./b.png, role: last_frame}]", ("image_with_roles", 1, "url"),
                     id="role-url"),
        pytest.param("veo3.1-fast-official", "last_frame_image: ./b.png\n    "
                     "first_frame_image: https://example.com/a.png", ("last_frame_image",),
                     id="last-frame"),
    ],
)  # fmt: skip
def test_local_files_in_any_image_field_are_checked_and_uploaded(
    tmp_path: Path, model: str, field: str, pointer: tuple[Any, ...]
) -> None:
    """A missing file is named at its line; a present one becomes an upload at its place."""
    (tmp_path / "a.png").write_bytes(png(10))
    path = write(tmp_path, f"version: 1\njobs:\n  - model: {model}\n    prompt: a\n    {field}\n")
    text = refused(path)
    assert "b.png does not exist" in text and text.count(f"{path}:") == 1, text
    (tmp_path / "b.png").write_bytes(png(20))
    (job,) = load_manifests([path])[0].jobs
    assert pointer in [u.pointer for u in job.uploads]
    sent = job.body({u.pointer: f"https://up.test/{i}.png" for i, u in enumerate(job.uploads)})
    node: Any = sent
    for step in pointer:
        node = node[step]
    assert str(node).startswith("https://up.test/")


# -- runs ------------------------------------------------------------------------------------


async def run(srv: Any, manifest: str, **overrides: Any) -> tuple[int, dict[str, Any], str]:
    """``run`` in process: exit code, summary, and what it said on stderr."""
    summary = Path(manifest).with_name("summary.json")
    fields = {"api_key": Secret(KEY), "base_url": srv.base_url, "policy": NO_WAIT,
              "summary_json": str(summary)} | overrides  # fmt: skip
    console = Console(stream=io.StringIO())
    with contextlib.redirect_stdout(io.StringIO()):
        code = await app.run(RunConfig(manifests=(manifest,), **fields), console)
    assert isinstance(console.stream, io.StringIO)
    return code, json.loads(summary.read_text(encoding="utf-8")), console.stream.getvalue()


MIXED = """version: 1
name: mixed
jobs:
  - {id: s, model: sora-2, prompt: A fox in snow, duration: 4}
  - {id: w, model: wan2.7, prompt: A fox in snow, size: '9:16', image_urls: [./a.png, ./b.png]}
  - {id: d, model: doubao-seedance-2.0, prompt: A fox, image_with_roles: [{url: ./a.png, role: first_frame}]}
  - {id: v, model: veo3.1-fast, prompt: A fox in snow}
  - {id: k, model: kling-v3, prompt: A fox in snow, mode: pro}
  - {id: g, model: grok-imagine-1.0-video-apimart, prompt: A fox in snow}
  - {id: h, model: MiniMax-Hailuo-2.3, prompt: A fox in snow, first_frame_image: ./b.png}
"""  # noqa: E501


async def test_a_mixed_manifest_runs_and_resumes_without_resending(emulator, tmp_path) -> None:
    """Seven models, local images in three field kinds: all sent once, each upload once."""
    (tmp_path / "a.png").write_bytes(png(10))
    (tmp_path / "b.png").write_bytes(png(20))
    srv = await emulator(key=KEY)
    path = write(tmp_path, MIXED)
    plan = plan_json(load_manifests([path]), merged_prices([]))
    assert plan["totals"]["unpriced"] == 5  # wan, veo, kling, grok, hailuo: no known price
    code, summary, _ = await run(srv, path)
    assert code == 0 and summary["this_run"] == {"submitted": 7}
    stats = srv.emulator.stats()
    assert stats["tasks_created"] == 7 and stats["uploads"] == 2
    rows = read_latest(tmp_path / "m.ledger.csv")
    wan = json.loads(rows["w"]["request"])
    assert len(wan["image_urls"]) == 2 and all(u.startswith("http") for u in wan["image_urls"])
    assert rows["w"]["image_file"].count("\n") == 1 and rows["w"]["aspect_ratio"] == "9:16"
    assert rows["d"]["resolution"] == "480p"  # the API's default, which set the price
    assert rows["g"]["task_id"].startswith("task_")  # Grok's {data: {id}} answer, read
    code, summary, _ = await run(srv, path)
    assert code == 0 and "submitted" not in summary["this_run"]
    assert srv.emulator.stats()["tasks_created"] == 7
    assert json.loads(rows["h"]["request"])["first_frame_image"] == wan["image_urls"][1]


async def test_a_retired_model_stops_its_jobs_and_the_others_go_on(emulator, tmp_path) -> None:
    """The API says a model is unavailable: one try, its jobs 'error', other models sent."""
    srv = await emulator(key=KEY, retired_models=frozenset({"sora-2"}))
    jobs = "".join(f"  - {{id: s{i}, model: sora-2, prompt: a{i}}}\n" for i in range(4))
    jobs += "".join(f"  - {{id: w{i}, model: wan2.7, prompt: b{i}}}\n" for i in range(3))
    path = write(tmp_path, "version: 1\njobs:\n" + jobs)
    code, summary, err = await run(srv, path, concurrency=1)
    assert code == 1
    rows = read_latest(tmp_path / "m.ledger.csv")
    assert {rows[f"s{i}"]["status"] for i in range(4)} == {"error"}
    assert {rows[f"w{i}"]["status"] for i in range(3)} == {"submitted"}
    assert srv.emulator.stats()["unavailable_models"] == {"sora-2": 1}
    assert "model sora-2: the API does not serve it" in err
    assert "sora-2" in summary["unavailable_models"]
    assert "not sent" in rows["s3"]["error"]


async def test_budget_refuses_jobs_without_a_known_price(emulator, tmp_path) -> None:
    """--budget cannot bound what has no price: such jobs are held, named with the fix."""
    srv = await emulator(key=KEY)
    path = write(tmp_path, "version: 1\njobs:\n  - {id: s, model: sora-2, prompt: a}\n"
                 "  - {id: w, model: wan2.7, prompt: b}\n")  # fmt: skip
    code, summary, err = await run(srv, path, budget=10.0)
    assert code == 0 and summary["held_by_budget"] == 1
    assert "job 'w' has no known price (wan2.7)" in err and "--price" in err
    code, summary, _ = await run(srv, path, budget=10.0, prices={"wan2.7": 0.1})
    assert code == 0 and summary["this_run"]["submitted"] == 1


# -- upgrades: ledgers written by 0.1 keep their meaning ---------------------------------------


def test_jobs_of_a_0_1_ledger_keep_their_ids_fingerprints_and_keys() -> None:
    """The fixture ledger's every job: same id, fingerprint and Idempotency-Key today."""
    (manifest,) = load_manifests([str(FIXTURE / "compat.yaml")])
    with (FIXTURE / "compat.ledger.csv").open(encoding="utf-8", newline="") as stream:
        recorded = {row["job_id"]: row for row in csv.DictReader(stream)}
    today = {job.job_id: job for job in manifest.jobs}
    assert set(today) == set(recorded)
    for job_id, row in recorded.items():
        assert today[job_id].fingerprint == row["fingerprint"], job_id
        assert today[job_id].idempotency_key == row["idempotency_key"], job_id


def test_a_0_1_plan_is_reproduced(tmp_path: Path) -> None:
    """The fingerprints 0.1's `plan --json` printed are today's."""
    old = json.loads((FIXTURE / "plan.json").read_text(encoding="utf-8"))
    (manifest,) = load_manifests([str(FIXTURE / "compat.yaml")])
    now = {job.job_id: job.fingerprint for job in manifest.jobs}
    assert now == {job["job_id"]: job["fingerprint"] for job in old["jobs"]}


async def test_a_0_1_ledger_resumes_without_resending(emulator, tmp_path) -> None:
    """Running the 0.1 manifest on its 0.1 ledger sends nothing: every job is already there."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    manifest = str(tmp_path / "old" / "compat.yaml")
    ledger = str(tmp_path / "old" / "compat.ledger.csv")
    srv = await emulator(key=KEY, adopt_tasks=True)
    code, summary, err = await run(srv, manifest, ledger=ledger, mock=True)
    assert "submitted" not in summary["this_run"], err
    assert srv.emulator.stats()["requests"].get("submit", 0) == 0
    assert code == 0


@pytest.mark.parametrize(
    ("where", "status"),
    [
        pytest.param("prepare", "error", id="before-the-post"),
        pytest.param("client", "unknown", id="while-posting"),
    ],
)
async def test_an_unforeseen_failure_of_one_job_is_recorded_and_the_others_go_on(
    emulator, tmp_path, monkeypatch, where: str, status: str
) -> None:
    """A bug in one job's submission: 'error' before the POST, 'unknown' once it may have left."""
    srv = await emulator(key=KEY)
    jobs = "  - {id: a, prompt: one}\n  - {id: boom, prompt: two}\n  - {id: c, prompt: three}\n"
    path = write(tmp_path, "version: 1\ndefaults: {model: wan2.7}\njobs:\n" + jobs)
    target = Submitter._prepare if where == "prepare" else Client.submit

    async def flaky(self: Any, job: Any, *args: Any) -> Any:
        if job.job_id == "boom":
            raise TypeError("a bug nobody foresaw")
        return await target(self, job, *args)

    monkeypatch.setattr(Submitter if where == "prepare" else Client,
                        "_prepare" if where == "prepare" else "submit", flaky)
    code, _, _ = await run(srv, path, concurrency=1)
    rows = read_latest(tmp_path / "m.ledger.csv")
    assert rows["boom"]["status"] == status
    assert "TypeError: a bug nobody foresaw" in rows["boom"]["error"]
    assert rows["a"]["status"] == rows["c"]["status"] == "submitted"
    assert code == 1


async def test_a_damaged_task_id_is_skipped_without_ending_the_poll_run(emulator, tmp_path) -> None:
    """A task id the client refuses to send: that task is left alone, the others are polled."""
    srv = await emulator(key=KEY)
    seen: list[str] = []
    with open_ledger(tmp_path / "l.csv", mock=False, base_url=srv.base_url) as ledger:
        async with Client(srv.base_url, Secret(KEY)) as client:
            job = make_job("ok", model="wan2.7", prompt="a lake", manifest_name="m")
            task = (await client.submit(job)).task_id
            poller = Poller(client, ledger, Limiter(2), NO_WAIT, asyncio.Event(),
                            PollTiming(first=0.0, interval=0.0), repeat=False,
                            on_error=lambda job, exc: seen.append(job))
            poller.add("bad", "../../v1/balance", delay=0.0)
            poller.add("ok", task, delay=0.0)
            poller.close()
            await asyncio.wait_for(poller.work(), 10)
        assert poller.fatal is None and seen == ["bad"]
        assert ledger.latest["ok"]["status"] in ("pending", "processing", "completed")
        assert "bad" not in ledger.latest


async def test_no_new_job_starts_after_the_deadline(emulator, tmp_path) -> None:
    """--deadline already passed: nothing is bought, every job is held and the run exits 1."""
    srv = await emulator(key=KEY)
    path = write(tmp_path, "version: 1\ndefaults: {model: wan2.7}\njobs:\n"
                 "  - {id: a, prompt: one}\n  - {id: b, prompt: two}\n")  # fmt: skip
    timing = PollTiming(deadline=time.monotonic() - 1.0)
    code, summary, _ = await run(srv, path, timing=timing)
    assert code == 1 and summary["held_by_deadline"] == 2
    assert srv.emulator.stats()["requests"].get("submit", 0) == 0
