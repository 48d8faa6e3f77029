"""Jobs built in code, as the manifest loader builds them (defaults and fields from the catalog)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from runner.manifest.catalog import load_catalog
from runner.models import Job, Upload


def make_job(
    job_id: str,
    *,
    manifest: str = "",
    manifest_name: str = "",
    line: int = 0,
    image_url: str | None = None,
    image_file: str | None = None,
    image_sha256: str | None = None,
    **request: Any,
) -> Job:
    """A job whose request is ``request`` (None values left out), for its model in the catalog.

    ``image_url`` or ``image_file`` (with its ``image_sha256``) become ``image_urls[0]``.
    """
    body = {key: value for key, value in request.items() if value is not None}
    uploads: tuple[Upload, ...] = ()
    if image_url:
        body["image_urls"] = [image_url]
    if image_file:
        body["image_urls"] = [image_file]
        uploads = (Upload(("image_urls", 0), image_file, image_sha256 or ""),)
    spec = load_catalog().get(str(body.get("model", "")))
    return Job(
        job_id=job_id,
        request=body,
        uploads=uploads,
        defaults=spec.defaults if spec else {},
        fields=spec.fields if spec else {},
        manifest=manifest,
        manifest_name=manifest_name,
        line=line,
        catalogued=spec is not None,
    )


_META = ("job_id", "manifest", "manifest_name", "line")


def edit(job: Job, **changes: Any) -> Job:
    """``job`` with request fields (``prompt=...``; None removes one) or identity fields changed."""
    meta = {key: changes.pop(key) for key in _META if key in changes}
    request = {**job.request}
    if "image_url" in changes:
        changes["image_urls"] = [changes.pop("image_url")]
    for key, value in changes.items():
        if value is None:
            request.pop(key, None)
        else:
            request[key] = value
    return replace(job, request=request, **meta)
