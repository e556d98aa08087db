"""Per-node verification records, file hashing, temp names and atomic writes in the model dir."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from cluster.download.plan import RepoFile
from cluster.errors import ConfigError

# Everything llamacluster keeps in the model directory lives under this hidden folder: vLLM only
# globs weight files at the top level, so nothing here is ever loaded as a model file.
STATE_DIR = ".llamacluster/download"
HASH_BLOCK = 8 * 1024 * 1024
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_node_name(node: str) -> str:
    """Node names end up in file names and the User-Agent: letters, digits, '.', '_', '-'."""
    if not _NODE_NAME.match(node):
        raise ConfigError(
            f"node name {node!r} cannot be used in file names",
            hint="use letters, digits, '.', '_' or '-'",
        )
    return node


def state_dir(target: Path) -> Path:
    """The hidden folder holding records and staging areas inside the model directory."""
    return target / STATE_DIR


def record_path(target: Path, node: str) -> Path:
    """The record of one node: only that node ever writes it."""
    return state_dir(target) / f"{check_node_name(node)}.jsonl"


def temp_path(final: Path, node: str) -> Path:
    """A unique name next to ``final`` that no model loader picks up (hidden, ends in .part)."""
    return final.with_name(f".{final.name}.llc-{node}-{secrets.token_hex(4)}.part")


def is_own_temp(name: str, node: str) -> bool:
    """True for a temp file name that ``node`` created (and may therefore remove)."""
    return re.fullmatch(rf"\..+\.llc-{re.escape(node)}-[0-9a-f]{{8}}\.part", name) is not None


def staging_dir(target: Path, node: str) -> Path:
    """A fresh private folder for huggingface_hub's own downloader (it names files itself)."""
    return state_dir(target) / "staging" / f"{node}-{secrets.token_hex(4)}"


def remove_stale_temps(target: Path, node: str) -> list[Path]:
    """Delete this node's leftovers from an earlier, interrupted run (never another node's)."""
    removed: list[Path] = []
    for root, dirs, files in os.walk(target):
        if Path(root) == target:
            dirs[:] = [d for d in dirs if d != ".llamacluster"]
        for name in files:
            if is_own_temp(name, node):
                p = Path(root) / name
                p.unlink(missing_ok=True)
                removed.append(p)
    staging = state_dir(target) / "staging"
    if staging.is_dir():
        import shutil

        for d in staging.iterdir():
            if d.name.startswith(f"{node}-") and len(d.name) == len(node) + 9:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def hash_file(
    path: Path, *, git_blob: bool = False, on_bytes: Callable[[int], None] | None = None
) -> tuple[str, str | None]:
    """sha256 of the file, and its git blob sha1 too when ``git_blob`` (one read for both)."""
    sha256 = hashlib.sha256()
    sha1 = None
    if git_blob:
        sha1 = hashlib.sha1()
        sha1.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            sha256.update(block)
            if sha1 is not None:
                sha1.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


class RecordEntry(BaseModel):
    """One verified file, as its node wrote it down right after the atomic rename."""

    path: str = Field(description="Path inside the model directory.")
    size: int = Field(description="Size in bytes.")
    sha256: str = Field(description="sha256 of the content, computed while verifying.")
    checksum_id: str = Field(description="The hub's identity of the content (see RepoFile).")
    mtime_ns: int = Field(description="mtime after the rename: a later change invalidates it.")
    node: str = Field(description="The node that fetched and verified it.")
    commit: str = Field(description="The commit the file belongs to.")


def append_record(target: Path, entry: RecordEntry, *, durable: bool = False) -> None:
    """Append one line to the node's own record (fsync'd only when ``durable``: a lost line
    just means the file is fetched again)."""
    path = record_path(target, entry.node)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(entry.model_dump_json() + "\n")
        fh.flush()
        if durable:
            os.fsync(fh.fileno())


def _record_lines(path: Path) -> Iterator[RecordEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            yield RecordEntry.model_validate_json(line)
        except (ValidationError, json.JSONDecodeError):
            continue  # a line torn by a crash: that file simply counts as not verified


def read_records(target: Path) -> dict[str, list[RecordEntry]]:
    """Every node's records, by file path (reading others' records is fine; writing is not)."""
    out: dict[str, list[RecordEntry]] = {}
    d = state_dir(target)
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.jsonl")):
        for entry in _record_lines(path):
            out.setdefault(entry.path, []).append(entry)
    return out


def verified_entry(
    target: Path, f: RepoFile, records: dict[str, list[RecordEntry]]
) -> RecordEntry | None:
    """The record proving ``f`` is in place, without re-hashing: same content id, size, mtime."""
    try:
        st = (target / f.path).stat()
    except FileNotFoundError:
        return None
    for entry in reversed(records.get(f.path, [])):
        if (
            entry.checksum_id == f.checksum_id
            and entry.size == f.size == st.st_size
            and entry.mtime_ns == st.st_mtime_ns
        ):
            return entry
    return None
