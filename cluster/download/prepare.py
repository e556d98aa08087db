"""Before any byte is fetched (on the head, under the lease): one commit per directory, and room."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from cluster.download.errors import DiskFullError
from cluster.download.manifest import MANIFEST_NAME, load_manifest, manifest_path
from cluster.download.plan import DownloadPlan
from cluster.download.records import RecordEntry, is_own_temp, read_records, verified_entry
from cluster.errors import ConfigError, NotReadyError


class CommitMixError(ConfigError):
    """The directory holds files of another commit (or repository): refused, never mixed."""


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (None: unknown)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def commits_in_place(target: Path, records: dict[str, list[RecordEntry]]) -> Counter[str]:
    """Commits of the verified files in place now, with how many files each: a record counts
    only while its file still has the recorded size and mtime."""
    found: Counter[str] = Counter()
    for path, entries in records.items():
        try:
            st = (target / path).stat()
        except FileNotFoundError:
            continue
        for entry in reversed(entries):
            if entry.size == st.st_size and entry.mtime_ns == st.st_mtime_ns:
                found[entry.commit] += 1
                break
    return found


def check_one_commit(
    target: Path, plan: DownloadPlan, records: dict[str, list[RecordEntry]]
) -> None:
    """Refuse to fetch ``plan.commit`` into a directory that holds another commit or repository.

    A model directory is one commit of one repository: shards of two commits side by side would
    load as one model. What is already there is named, with the two ways out.
    """
    others: Counter[str] = Counter()
    held_repo = None
    if manifest_path(target).exists():
        try:
            manifest = load_manifest(target)
        except NotReadyError:
            manifest = None
        if manifest is not None:
            held_repo = manifest.repo
            if manifest.repo != plan.repo or manifest.commit != plan.commit:
                others[manifest.commit] += len(manifest.files)
    for commit, n in commits_in_place(target, records).items():
        if commit != plan.commit:
            others[commit] += n
    if not others:
        return
    commit, _ = others.most_common(1)[0]
    repo = held_repo or plan.repo
    raise CommitMixError(
        f"{target} already holds {repo}@{commit[:12]} ({MANIFEST_NAME} or verified files); "
        f"refusing to mix in {plan.repo}@{plan.commit[:12]}",
        hint=f"pass --revision {commit} to finish or keep that one, or download the new commit "
        "into another --target (or remove the directory first)",
    )


def stale_temp_bytes(target: Path, nodes: list[str]) -> int:
    """Bytes of the planned nodes' leftover ``.part`` files: each node removes its own before it
    fetches, so they count as free."""
    total = 0
    for root, dirs, files in os.walk(target):
        if Path(root) == target:
            dirs[:] = [d for d in dirs if d != ".llamacluster"]
        for name in files:
            if any(is_own_temp(name, n) for n in nodes):
                try:
                    total += (Path(root) / name).stat().st_size
                except FileNotFoundError:
                    continue
    return total


def check_free_space(
    target: Path, plan: DownloadPlan, records: dict[str, list[RecordEntry]], *, node: str
) -> dict[str, Any]:
    """Refuse up front when the bytes still to fetch (after resume credit) exceed the free space."""
    from cluster.download.progress import format_bytes

    todo = [f for f in plan.files if verified_entry(target, f, records) is None]
    needed = sum(f.size for f in todo)
    free = free_bytes(target)
    reclaimable = stale_temp_bytes(target, [a.node for a in plan.nodes])
    if free is not None and needed > free + reclaimable:
        verified = len(plan.files) - len(todo)
        raise DiskFullError(
            f"node {node}: not enough space in {target}: {format_bytes(needed)} still to fetch "
            f"({len(todo)} file(s); {verified} already verified), {format_bytes(free)} free",
            node=node,
            path=str(target),
            needed=needed,
            free=free,
        )
    return {"to_fetch_bytes": needed, "to_fetch_files": len(todo), "free_bytes": free}


def prepare_target(target: Path, plan: DownloadPlan, *, node: str) -> dict[str, Any]:
    """The checks made once, on the head, after taking the lease and before any node fetches."""
    target = Path(target)
    records = read_records(target)
    check_one_commit(target, plan, records)
    return check_free_space(target, plan, records, node=node)
