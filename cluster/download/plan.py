"""Download planning: resolve one commit, pick the files, balance their bytes across the nodes."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

from pydantic import BaseModel, Field, computed_field

from cluster.errors import ConfigError, DownloadError

# Files that duplicate the safetensors weights in another format; skipped when safetensors exist.
DUPLICATE_WEIGHT_PATTERNS: tuple[str, ...] = (
    "pytorch_model*",
    "tf_model*",
    "flax_model*",
    "*.msgpack",
    "*.h5",
    "*.ckpt",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "openvino/*",
)
# Always skipped unless a pattern of --include names them: original checkpoints and other formats
# vLLM does not load from a safetensors model directory.
DEFAULT_EXCLUDE_PATTERNS: tuple[str, ...] = (
    "original/*",
    "*.pth",
    "*.pt",
    "consolidated*",
    "*.gguf",
)
# Suffixes of weight files: these are spread over the nodes, everything else goes to the head.
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".ckpt")
# A file this large is balanced like a weight file whatever its name (a huge tokenizer, say).
LARGE_FILE_BYTES = 16 * 1024 * 1024


# Names llamacluster itself keeps at the top of the model directory: a hub file must not replace
# them (a forged record or manifest would make unverified bytes look verified).
RESERVED_TOP_LEVEL = (".llamacluster", "manifest.json")


def unsafe_path_reason(path: str) -> str | None:
    """Why a file name from the hub must not be written under the model directory, or None.

    Refused: empty, absolute, a backslash, NUL or another control character, a ``.``, ``..`` or
    empty component, and llamacluster's own top-level names. Pure: no filesystem access.
    """
    if not path:
        return "the name is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "it contains a NUL or control character"
    if "\\" in path:
        return "it contains a backslash"
    if path.startswith("/") or PurePosixPath(path).is_absolute():
        return "it is an absolute path"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "it has an empty, '.' or '..' component"
    if parts[0] in RESERVED_TOP_LEVEL:
        return f"{parts[0]!r} is llamacluster's own name in the model directory"
    return None


def check_repo_paths(repo: str, paths: Iterable[str]) -> None:
    """Refuse the whole listing when any name is unsafe: one line naming the first such file."""
    for path in paths:
        reason = unsafe_path_reason(path)
        if reason is not None:
            raise DownloadError(
                f"the hub listed an unsafe file name {path!r} in {repo} ({reason}); "
                "nothing was written",
                hint="a hub or mirror that sends such names cannot be trusted: check HF_ENDPOINT "
                "and the repository",
            )


class RepoFile(BaseModel):
    """One file of the repository at the resolved commit, with what it must hash to."""

    path: str = Field(description="Path inside the repository, '/' separated.")
    size: int = Field(ge=0, description="Size in bytes (the real file, not an LFS pointer).")
    sha256: str | None = Field(
        default=None, description="LFS sha256 from the hub; None for files stored in plain git."
    )
    git_sha1: str | None = Field(
        default=None,
        description="Git blob id (sha1 of 'blob <size>\\0' + content) for plain files.",
    )

    @property
    def checksum_id(self) -> str:
        """The hub's identity of the content: LFS sha256, else git blob sha1, else the size."""
        return self.sha256 or self.git_sha1 or f"size:{self.size}"

    @property
    def is_weight(self) -> bool:
        """Weights (and any large file) are balanced across nodes; small files go to the head."""
        return self.path.endswith(WEIGHT_SUFFIXES) or self.size >= LARGE_FILE_BYTES


class NodeAssignment(BaseModel):
    """The files one node fetches; no other node writes any of them."""

    node: str = Field(description="Node name, used in temp names, record files and User-Agent.")
    files: list[RepoFile] = Field(default_factory=list, description="Files this node fetches.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        """Bytes this node fetches."""
        return sum(f.size for f in self.files)


class DownloadPlan(BaseModel):
    """Everything the nodes need to fetch one commit of one repository into one directory."""

    repo: str = Field(description="Repository id on the hub, e.g. 'org/name'.")
    revision: str = Field(description="The revision the user asked for (branch, tag or commit).")
    commit: str = Field(description="The commit the revision resolved to; every node fetches it.")
    repo_type: str = Field(default="model", description="Hub repository type.")
    nodes: list[NodeAssignment] = Field(description="Per-node assignments, head first.")
    excluded: list[str] = Field(default_factory=list, description="Files skipped by patterns.")

    @property
    def files(self) -> list[RepoFile]:
        """Every planned file, across all nodes."""
        return [f for a in self.nodes for f in a.files]

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole download."""
        return sum(a.total_bytes for a in self.nodes)

    def assignment(self, node: str) -> NodeAssignment:
        """The assignment of one node by name."""
        for a in self.nodes:
            if a.node == node:
                return a
        raise ConfigError(f"node {node!r} is not in the download plan")


def _matches(path: str, patterns: Iterable[str]) -> bool:
    name = os.path.basename(path)
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def select_files(
    files: Sequence[RepoFile],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[RepoFile], list[str]]:
    """Keep the files a plain vLLM model directory needs; return (kept, excluded paths).

    ``include`` (if given) keeps only matching files and overrides the default skips for them;
    ``exclude`` always wins. Duplicated weight formats are skipped only when safetensors exist.
    """
    has_safetensors = any(f.path.endswith(".safetensors") for f in files)
    default_skip = DEFAULT_EXCLUDE_PATTERNS + (DUPLICATE_WEIGHT_PATTERNS if has_safetensors else ())
    kept: list[RepoFile] = []
    excluded: list[str] = []
    for f in files:
        explicitly_included = bool(include) and _matches(f.path, include)
        dropped = (
            (bool(include) and not explicitly_included)
            or _matches(f.path, exclude)
            or (not explicitly_included and _matches(f.path, default_skip))
        )
        if dropped:
            excluded.append(f.path)
        else:
            kept.append(f)
    return kept, excluded


def assign_files(files: Sequence[RepoFile], nodes: Sequence[str]) -> list[NodeAssignment]:
    """Balance bytes: small files to the head, weights largest first to the least-loaded node.

    Deterministic: ties in size break on the path, ties in load on the node order (head first),
    so a re-run with the same nodes gives every file to the same node again.
    """
    if not nodes:
        raise ConfigError("no nodes to download to", hint="give --ips FILE or --local")
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"node names must be unique, got {list(nodes)}")
    seen: set[str] = set()
    for f in files:
        if f.path in seen:
            raise DownloadError(f"file {f.path!r} listed twice by the hub")
        seen.add(f.path)
    buckets: list[list[RepoFile]] = [[] for _ in nodes]
    loads = [0] * len(nodes)
    for f in sorted((f for f in files if not f.is_weight), key=lambda f: f.path):
        buckets[0].append(f)
        loads[0] += f.size
    for f in sorted((f for f in files if f.is_weight), key=lambda f: (-f.size, f.path)):
        target = min(range(len(nodes)), key=lambda i: (loads[i], i))
        buckets[target].append(f)
        loads[target] += f.size
    return [
        NodeAssignment(node=n, files=sorted(b, key=lambda f: f.path))
        for n, b in zip(nodes, buckets, strict=True)
    ]


def make_plan(
    *,
    repo: str,
    revision: str,
    commit: str,
    files: Sequence[RepoFile],
    nodes: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> DownloadPlan:
    """Pure: choose the files and assign them to nodes for one resolved commit."""
    check_repo_paths(repo, (f.path for f in files))
    kept, excluded = select_files(files, include=include, exclude=exclude)
    if not kept:
        raise ConfigError(
            f"no files of {repo}@{commit[:12]} match the include/exclude patterns",
            hint="check --include/--exclude",
        )
    return DownloadPlan(
        repo=repo,
        revision=revision,
        commit=commit,
        nodes=assign_files(kept, nodes),
        excluded=sorted(excluded),
    )


def resolve_repo_files(
    repo: str, *, revision: str | None, token: str | None
) -> tuple[str, list[RepoFile]]:
    """Ask the hub (HF_ENDPOINT) once for the commit of ``revision`` and its files' sizes/hashes."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from cluster.download.errors import access_error

    try:
        # Tagged like the nodes, so a hub log tells the planning call from the transfers.
        api = HfApi(user_agent={"llamacluster-node": "controller"})
        info = api.model_info(repo, revision=revision, files_metadata=True, token=token or False)
    except GatedRepoError as exc:
        raise access_error(repo, status=401, token_given=bool(token)) from exc
    except RevisionNotFoundError as exc:
        raise ConfigError(
            f"revision {revision!r} not found in {repo}", hint="check --revision"
        ) from exc
    except RepositoryNotFoundError as exc:
        # The hub answers 401 for private repositories without access, like for missing ones.
        raise access_error(repo, status=404, token_given=bool(token)) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise access_error(repo, status=status, token_given=bool(token)) from exc
        raise DownloadError(f"the hub refused to list {repo}: {exc}".splitlines()[0]) from exc
    except OSError as exc:
        raise DownloadError(
            f"cannot reach the hub for {repo}: {exc}", hint="check the network and HF_ENDPOINT"
        ) from exc
    if not info.sha:
        raise DownloadError(f"the hub gave no commit for {repo}@{revision or 'main'}")
    files = []
    for s in info.siblings or []:
        if s.size is None:
            raise DownloadError(f"the hub gave no size for {repo}/{s.rfilename}")
        files.append(
            RepoFile(
                path=s.rfilename,
                size=s.lfs.size if s.lfs else s.size,
                sha256=s.lfs.sha256 if s.lfs else None,
                git_sha1=None if s.lfs else s.blob_id,
            )
        )
    check_repo_paths(repo, (f.path for f in files))
    return info.sha, files


def plan_download(
    repo: str,
    *,
    nodes: Sequence[str],
    revision: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    token: str | None = None,
) -> DownloadPlan:
    """Resolve ``revision`` to one commit on the hub and plan which node fetches which file."""
    commit, files = resolve_repo_files(repo, revision=revision, token=token)
    return make_plan(
        repo=repo,
        revision=revision or "main",
        commit=commit,
        files=files,
        nodes=nodes,
        include=include,
        exclude=exclude,
    )
