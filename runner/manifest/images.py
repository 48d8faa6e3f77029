"""Local images named in a manifest: found, sized and recognised by content before upload."""

from __future__ import annotations

import hashlib
from pathlib import Path

from runner.manifest.catalog import UPLOAD_MAX_BYTES
from runner.manifest.diagnostics import DocPath, Reporter

_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))


class LocalImages:
    """The images of one manifest, relative to its folder; each file is read once per limit."""

    def __init__(self, folder: Path, reporter: Reporter) -> None:
        self.folder = folder
        self.reporter = reporter
        self._seen: dict[tuple[Path, int | None], tuple[str | None, str, str | None]] = {}

    def find(self, image: str, source: DocPath, limit: int | None) -> tuple[str, str] | None:
        """Absolute path and SHA-256 of a local image, or None and a reported problem."""
        try:
            path = (self.folder / image).resolve()
        except (OSError, RuntimeError, ValueError):
            path = self.folder / image
        if (path, limit) not in self._seen:
            self._seen[path, limit] = inspect_image(path, self.folder, limit)
        digest, problem, hint = self._seen[path, limit]
        if digest is None:
            self.reporter.at(source, problem, hint, late=True)
            return None
        return str(path), digest


def inspect_image(
    path: Path, folder: Path, limit: int | None
) -> tuple[str | None, str, str | None]:
    """(SHA-256 of the content, "", None) for a usable image, else (None, problem, hint)."""
    try:
        if not path.is_file():
            if path.exists():
                return None, f"{path} is not a file", None
            hint = f"a relative path starts at the manifest's folder ({folder.absolute()})"
            return None, f"image file {path} does not exist", hint
        size = path.stat().st_size
        limit = limit or UPLOAD_MAX_BYTES
        if size > limit:
            most = f"{limit / 1e6:g} MB"
            message = f"image {path} is {size / 1e6:.1f} MB; the model takes at most {most}"
            return None, message, "shrink or recompress it"
        with path.open("rb") as stream:
            content = stream.read(limit + 1)
    except (OSError, ValueError) as exc:
        return None, f"cannot read image {path}: {getattr(exc, 'strerror', None) or exc}", None
    kind = next((name for magic, name in _IMAGE_MAGIC if content.startswith(magic)), None)
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        kind = "WebP"
    if kind is None:
        message = f"{path} is not a JPEG, PNG or WebP image (judged by its content)"
        return None, message, "convert it to PNG or JPEG"
    return hashlib.sha256(content).hexdigest(), "", None
