"""The model directory's manifest: written once every node finished, checked before serving."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from cluster.download.plan import DownloadPlan
from cluster.download.records import hash_file, read_records, verified_entry
from cluster.errors import DownloadError, NotReadyError
from cluster.files import atomic_write

MANIFEST_NAME = "manifest.json"


class ManifestFile(BaseModel):
    """One file of the model directory and what it hashes to."""

    path: str = Field(description="Path inside the model directory.")
    size: int = Field(description="Size in bytes.")
    sha256: str = Field(description="sha256 of the content.")
    node: str = Field(description="The node that fetched it.")


class Manifest(BaseModel):
    """What is in the model directory: one commit of one repository, every file verified."""

    repo: str = Field(description="Repository id on the hub.")
    revision: str = Field(description="The revision asked for.")
    commit: str = Field(description="The commit every file belongs to.")
    complete: bool = Field(description="True only when every planned file was verified.")
    files: list[ManifestFile] = Field(description="Every file, sorted by path.")
    created_at: float = Field(description="Unix time the manifest was written.")

    @property
    def total_bytes(self) -> int:
        """Bytes of all files."""
        return sum(f.size for f in self.files)


def manifest_path(model_dir: Path) -> Path:
    """Where the manifest lives."""
    return Path(model_dir) / MANIFEST_NAME


def remove_manifest(model_dir: Path) -> None:
    """Drop the manifest before files change, so serving cannot start on a half-updated dir."""
    manifest_path(model_dir).unlink(missing_ok=True)


def write_manifest(model_dir: Path, plan: DownloadPlan) -> Manifest:
    """Merge every node's records into ``manifest.json`` (atomic); refuse if a file is missing."""
    model_dir = Path(model_dir)
    records = read_records(model_dir)
    files: list[ManifestFile] = []
    missing: list[str] = []
    for f in sorted(plan.files, key=lambda f: f.path):
        entry = verified_entry(model_dir, f, records)
        if entry is None:
            missing.append(f.path)
        else:
            files.append(
                ManifestFile(path=f.path, size=f.size, sha256=entry.sha256, node=entry.node)
            )
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DownloadError(
            f"{len(missing)} file(s) not verified in {model_dir}: {shown}",
            hint="run the same `llamacluster download` again to fetch what is missing",
        )
    manifest = Manifest(
        repo=plan.repo,
        revision=plan.revision,
        commit=plan.commit,
        complete=True,
        files=files,
        created_at=time.time(),
    )
    atomic_write(manifest_path(model_dir), manifest.model_dump_json(indent=2) + "\n")
    return manifest


def parse_manifest(text: str, *, where: Path | str) -> Manifest:
    """A manifest from its JSON text (read here or on another node); ``where`` names it."""
    try:
        return Manifest.model_validate_json(text)
    except (ValidationError, json.JSONDecodeError) as exc:
        raise NotReadyError(
            f"{where} is not a valid manifest",
            hint="run `llamacluster download` again to rewrite it",
        ) from exc


def load_manifest(model_dir: Path) -> Manifest:
    """Read the manifest, with an error that says how to make one."""
    path = manifest_path(model_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise NotReadyError(
            f"no {MANIFEST_NAME} in {model_dir}: the model download is missing or unfinished",
            hint="run `llamacluster download REPO --target DIR` first",
        ) from exc
    except UnicodeDecodeError as exc:
        raise NotReadyError(
            f"{path} is not a valid manifest",
            hint="run `llamacluster download` again to rewrite it",
        ) from exc
    return parse_manifest(text, where=path)


def require_complete_manifest(model_dir: Path) -> Manifest:
    """For the serving stage: refuse a model dir without a complete manifest or with files gone.

    Cheap (sizes only); `verify_model_dir` re-hashes.
    """
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    if not manifest.complete or not manifest.files:
        raise NotReadyError(
            f"the manifest in {model_dir} is not complete",
            hint="run `llamacluster download` again to finish the download",
        )
    for f in manifest.files:
        p = model_dir / f.path
        if not p.is_file() or p.stat().st_size != f.size:
            raise NotReadyError(
                f"{p} is missing or has the wrong size (manifest says {f.size} bytes)",
                hint="run `llamacluster download` again to fetch it",
            )
    return manifest


class BadFile(BaseModel):
    """A file that failed re-verification, and why."""

    path: str
    reason: str


def _check_file(model_dir: Path, f: ManifestFile) -> BadFile | None:
    p = model_dir / f.path
    if not p.is_file():
        return BadFile(path=f.path, reason="missing")
    if (size := p.stat().st_size) != f.size:
        return BadFile(path=f.path, reason=f"size {size}, expected {f.size}")
    sha256, _ = hash_file(p)
    if sha256 != f.sha256:
        return BadFile(path=f.path, reason=f"sha256 {sha256[:16]}..., expected {f.sha256[:16]}...")
    return None


def verify_model_dir(
    model_dir: Path,
    *,
    on_file: Callable[[str, int], None] | None = None,
    jobs: int = 4,
) -> tuple[Manifest, list[BadFile]]:
    """Re-hash every file in the manifest (``jobs`` at once: hashlib runs outside the GIL);
    return the manifest and every bad file found, in manifest order."""
    from concurrent.futures import ThreadPoolExecutor

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)

    def check(f: ManifestFile) -> BadFile | None:
        result = _check_file(model_dir, f)
        if on_file is not None:
            on_file(f.path, f.size)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        bad = [b for b in pool.map(check, manifest.files) if b is not None]
    if not manifest.complete:
        bad.append(BadFile(path=MANIFEST_NAME, reason="manifest is marked incomplete"))
    return manifest, bad
