"""A real HTTP model hub on loopback (HF_ENDPOINT) with fault switches, plus the demo model fixtures."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit


def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file (the hub's LFS oid for weight files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def iter_model_files(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Every regular file of a model directory, sorted, without hidden paths (download caches)."""
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p


#: The gated copy of the demo model served by the `hub` fixture.
GATED_REPO_ID = "llamacluster/demo-tiny-llama-gated"
#: User-Agent tag that names a node: "llamacluster-node/<name>" (see TESTBED "Loopback nodes").
NODE_TAG = re.compile(r"llamacluster-node/([A-Za-z0-9_.:@-]+)")
# Files the real hub keeps in LFS (served through a redirect to a blob URL).
_LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx"}
_LFS_MIN_SIZE = 10 * 1024 * 1024
_CHUNK = 64 * 1024
_BURST_S = 0.25  # how far a capped client may run ahead after a stall


def node_user_agent(name: str) -> str:
    """The User-Agent a node sends so the hub can tell nodes apart (they all connect from 127.0.0.1)."""
    return f"llamacluster-node/{name}"


def identity_of(user_agent: str | None, client_address: str) -> str:
    """A request's identity: the node tag in the User-Agent, else the client's address."""
    match = NODE_TAG.search(user_agent or "")
    return match.group(1) if match else client_address


@dataclass(frozen=True)
class HubFile:
    """One file of a repo with the hashes the hub reports for it."""

    path: str
    size: int
    git_oid: str  # git blob sha1, the ETag of small files
    sha256: str  # the LFS oid, the ETag of LFS files
    lfs: bool
    local: Path

    @property
    def etag(self) -> str:
        """The identifier huggingface_hub stores the blob under (sha256 for LFS, git sha1 otherwise)."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self) -> dict[str, Any]:
        """This file as the tree / paths-info API lists it."""
        entry: dict[str, Any] = {
            "type": "file",
            "oid": self.git_oid,
            "size": self.size,
            "path": self.path,
        }
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


@dataclass
class HubRepo:
    """A local directory served as a model repo with one branch, "main", at a fixed commit."""

    repo_id: str
    root: Path
    gated: bool = False
    files: dict[str, HubFile] = field(default_factory=dict)
    commit: str = ""

    @classmethod
    def from_dir(cls, repo_id: str, root: Path, *, gated: bool = False) -> HubRepo:
        """Index every file under ``root`` (hashes computed once, at registration)."""
        files: dict[str, HubFile] = {}
        for local in iter_model_files(root):
            rel = local.relative_to(root).as_posix()
            size = local.stat().st_size
            git = hashlib.sha1(f"blob {size}\0".encode())
            with open(local, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    git.update(chunk)
            lfs = local.suffix in _LFS_SUFFIXES or size >= _LFS_MIN_SIZE
            files[rel] = HubFile(rel, size, git.hexdigest(), file_sha256(local), lfs, local)
        tree = "".join(f"{f.path}\0{f.git_oid}\n" for f in files.values())
        commit = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        return cls(repo_id=repo_id, root=root, gated=gated, files=files, commit=commit)

    def resolve(self, revision: str) -> str | None:
        """The commit a revision names ("main", or the commit itself); None if unknown."""
        return self.commit if revision in ("main", self.commit) else None


@dataclass
class HubRequest:
    """One request as the hub saw it (for asserting who fetched what)."""

    method: str
    path: str
    identity: str
    user_agent: str
    repo_id: str | None = None
    filename: str | None = None  # repo file the request was about (resolve or blob)
    range: str | None = None
    status: int = 0
    bytes_sent: int = 0
    dropped: bool = False
    authorized: bool = False
    started: float = 0.0
    finished: float = 0.0


@dataclass
class _Fault:
    kind: str  # "status" | "drop"
    remaining: int
    match: str | None
    status: int = 0
    retry_after: int | None = None
    after_bytes: int = 0
    identity: str | None = None
    method: str | None = None


class HubFaults:
    """Switches tests flip at run time to make the hub misbehave; ``reset()`` clears them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._corrupt: dict[str, int | None] = {}
        self._rates: dict[str | None, float] = {}
        self._buckets: dict[str, float] = {}

    def reset(self) -> None:
        """Remove every fault and bandwidth cap."""
        with self._lock:
            self._faults.clear()
            self._corrupt.clear()
            self._rates.clear()
            self._buckets.clear()

    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        match: str | None = None,
        retry_after: int | None = None,
        identity: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` (429, 500, 503, ...).

        ``match`` is a substring of the request path or file name (None: any request);
        ``retry_after`` adds a Retry-After header in seconds; ``identity`` and ``method``
        ("GET", "HEAD") narrow it to one client or one kind of request.
        """
        with self._lock:
            self._faults.append(
                _Fault(
                    "status",
                    count,
                    match,
                    status=status,
                    retry_after=retry_after,
                    identity=identity,
                    method=method,
                )
            )

    def rate_limit(
        self,
        *,
        count: int = 1,
        retry_after: int = 1,
        match: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with 429 and Retry-After, as the hub does."""
        self.fail_next(429, count=count, match=match, retry_after=retry_after, method=method)

    def drop_connection(
        self, match: str, *, after_bytes: int = 1024, count: int = 1, identity: str | None = None
    ) -> None:
        """Close the connection after ``after_bytes`` of the body of the next ``count`` matching downloads."""
        with self._lock:
            self._faults.append(
                _Fault("drop", count, match, after_bytes=after_bytes, identity=identity)
            )

    def corrupt(self, filename: str, *, offset: int | None = None) -> None:
        """Serve ``filename`` with one byte flipped (same size, same advertised hashes) from now on.

        ``offset`` defaults to the middle of the file.
        """
        with self._lock:
            self._corrupt[filename] = offset

    def limit_bandwidth(self, bytes_per_s: float, *, identity: str | None = None) -> None:
        """Cap the download rate of each client identity (None: every identity, each on its own)."""
        with self._lock:
            self._rates[identity] = float(bytes_per_s)

    def _take(self, kind: str, request: HubRequest, filename: str | None = None) -> _Fault | None:
        path, identity = request.path, request.identity
        with self._lock:
            for fault in self._faults:
                if fault.kind != kind or fault.remaining <= 0:
                    continue
                if fault.method is not None and fault.method != request.method:
                    continue
                if fault.identity is not None and fault.identity != identity:
                    continue
                if fault.match is not None and fault.match not in path and fault.match != filename:
                    continue
                fault.remaining -= 1
                return fault
        return None

    def _corrupt_offset(self, hub_file: HubFile) -> int | None:
        with self._lock:
            if hub_file.path not in self._corrupt:
                return None
            offset = self._corrupt[hub_file.path]
        return hub_file.size // 2 if offset is None else offset

    def _throttle(self, identity: str, nbytes: int) -> None:
        """Block until ``identity`` may send ``nbytes`` more (one shared budget per identity)."""
        with self._lock:
            rate = self._rates.get(identity, self._rates.get(None))
            if not rate:
                return
            now = time.monotonic()
            # A token bucket holding up to _BURST_S of sending: a sender that woke up late
            # catches up instead of losing the time, so the average stays at the cap.
            start = max(now - _BURST_S, self._buckets.get(identity, now))
            self._buckets[identity] = start + nbytes / rate
            wait = start + nbytes / rate - now
        if wait > 0:
            time.sleep(wait)

    def _chunk_size(self, identity: str) -> int:
        with self._lock:
            rate = self._rates.get(identity, self._rates.get(None))
        return _CHUNK if not rate else max(1024, min(_CHUNK, int(rate / 20)))


class LoopbackHub:
    """A Hugging Face Hub look-alike on 127.0.0.1 for huggingface_hub (HF_ENDPOINT) and hf_transfer.

    Serves model info (with ``files_metadata``), revision resolution, tree listing, paths-info,
    ``resolve`` downloads with the real hub's headers (LFS files via a 302 to a blob URL), HEAD,
    Range requests, gated repos (token required for files) and the fault switches in ``faults``.
    Every request is logged in ``requests``. It runs in a thread of the test process, so a
    client that holds the GIL while it downloads (``hf_transfer.download``) must run in a
    subprocess.
    """

    def __init__(self, *, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.host = host
        self.token = token or f"hf_loopback_{secrets.token_hex(8)}"
        self.faults = HubFaults()
        self.repos: dict[str, HubRepo] = {}
        self._log: list[HubRequest] = []
        self._log_lock = threading.Lock()
        self._secret = secrets.token_bytes(16)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LoopbackHub:
        """Bind a free port and serve in a background thread."""
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The endpoint to put in HF_ENDPOINT."""
        if self._server is None:
            raise RuntimeError("hub is not running")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment for a process that should download from this hub."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1"}

    # -- repos -----------------------------------------------------------------------------

    def add_repo(self, repo_id: str, path: str | Path, *, gated: bool = False) -> HubRepo:
        """Serve the directory ``path`` as model repo ``repo_id`` (branch "main")."""
        repo = HubRepo.from_dir(repo_id, Path(path), gated=gated)
        self.repos[repo_id] = repo
        return repo

    def file_url(self, repo_id: str, filename: str, *, revision: str = "main") -> str:
        """The ``resolve`` URL of a file (what hf_hub_url builds)."""
        return f"{self.url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    def auth_headers(self) -> dict[str, str]:
        """Headers that open gated repos."""
        return {"Authorization": f"Bearer {self.token}"}

    # -- request log -----------------------------------------------------------------------

    @property
    def requests(self) -> list[HubRequest]:
        """A copy of the request log, oldest first."""
        with self._log_lock:
            return list(self._log)

    def clear_log(self) -> None:
        """Forget logged requests."""
        with self._log_lock:
            self._log.clear()

    def fetched(
        self, *, identity: str | None = None, repo_id: str | None = None
    ) -> list[HubRequest]:
        """Successful body-carrying GETs of repo files (resolve or blob), optionally for one identity."""
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and r.filename is not None
            and r.status in (200, 206)
            and r.bytes_sent > 0
            and (identity is None or r.identity == identity)
            and (repo_id is None or r.repo_id == repo_id)
        ]

    def _record(self, entry: HubRequest) -> None:
        with self._log_lock:
            self._log.append(entry)

    # -- helpers for the handler -------------------------------------------------------------

    def _find_repo(self, rest: str) -> tuple[HubRepo, str] | None:
        for repo_id in sorted(self.repos, key=len, reverse=True):
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return self.repos[repo_id], rest[len(repo_id) :]
        return None

    def _blob_sig(self, repo: HubRepo, hub_file: HubFile) -> str:
        msg = f"{repo.repo_id}\0{repo.commit}\0{hub_file.path}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def _blob_url(self, repo: HubRepo, hub_file: HubFile) -> str:
        query = f"path={quote(hub_file.path)}&sig={self._blob_sig(repo, hub_file)}"
        return f"{self.url}/_lfs/{repo.repo_id}/{hub_file.sha256}?{query}"


class _HubHandler(BaseHTTPRequestHandler):
    """Routes one request; the hub it serves is set as a class attribute."""

    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1"
    timeout = 60  # idle keep-alive connections

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: requests go to the hub's own log instead of stderr."""

    # -- entry points ----------------------------------------------------------------------

    def do_GET(self) -> None:
        """GET: API calls, resolve and blob downloads."""
        self._dispatch()

    def do_HEAD(self) -> None:
        """HEAD: metadata of resolve and blob URLs."""
        self._dispatch()

    def do_POST(self) -> None:
        """POST: paths-info."""
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.query = parse_qs(url.query)
        self.entry = HubRequest(
            method=self.command,
            path=self.path,
            identity=identity_of(self.headers.get("User-Agent"), self.client_address[0]),
            user_agent=self.headers.get("User-Agent", ""),
            range=self.headers.get("Range"),
            started=time.monotonic(),
        )
        self.entry.authorized = self.headers.get("Authorization") == f"Bearer {self.hub.token}"
        body_len = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(body_len) if body_len else b""
        try:
            self._route(path)
        except (BrokenPipeError, ConnectionResetError):
            self.entry.dropped = True
            self.close_connection = True
        finally:
            self.entry.finished = time.monotonic()
            self.hub._record(self.entry)

    def _route(self, path: str) -> None:
        hub = self.hub
        if path.startswith("/api/models/"):
            found = hub._find_repo(path[len("/api/models/") :])
            if found is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            repo, tail = found
            self.entry.repo_id = repo.repo_id
            if self._injected_status(None):
                return None
            return self._api(repo, tail)
        if path.startswith("/_lfs/"):
            found = hub._find_repo(path[len("/_lfs/") :])
            if found is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            return self._blob(*found)
        found = hub._find_repo(path.lstrip("/"))
        if found is not None:
            repo, tail = found
            match = re.fullmatch(r"/resolve/([^/]+)/(.+)", tail)
            if match:
                self.entry.repo_id = repo.repo_id
                return self._resolve(repo, unquote(match.group(1)), match.group(2))
        return self._error(404, None, "Not found")

    # -- API -------------------------------------------------------------------------------

    def _api(self, repo: HubRepo, tail: str) -> None:
        if self.command == "GET" and (tail == "" or tail.startswith("/revision/")):
            revision = unquote(tail[len("/revision/") :]) if tail else "main"
            commit = self._commit_or_404(repo, revision)
            return None if commit is None else self._json(self._model_info(repo))
        tree = re.fullmatch(r"/tree/([^/]+)(/.*)?", tail)
        if self.command == "GET" and tree:
            if self._commit_or_404(repo, unquote(tree.group(1))) is None:
                return None
            prefix = unquote(tree.group(2) or "").strip("/")
            recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._json(self._tree(repo, prefix, recursive=recursive))
        info = re.fullmatch(r"/paths-info/([^/]+)", tail)
        if self.command == "POST" and info:
            if self._commit_or_404(repo, unquote(info.group(1))) is None:
                return None
            form = parse_qs(self.body.decode()) if self.body else {}
            if self.headers.get("Content-Type", "").startswith("application/json"):
                form = {"paths": json.loads(self.body or b"{}").get("paths", [])}
            wanted = form.get("paths", [])
            entries = [repo.files[p].tree_entry() for p in wanted if p in repo.files]
            return self._json(entries)
        return self._error(404, None, "Not found")

    def _model_info(self, repo: HubRepo) -> dict[str, Any]:
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("true", "1")
        siblings = []
        for f in repo.files.values():
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sibling)
        config = _read_json(repo.root / "config.json")
        return {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.commit,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": ["transformers", "safetensors", "llama", "text-generation"],
            "config": {k: config[k] for k in ("architectures", "model_type") if k in config},
            "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        }

    def _tree(self, repo: HubRepo, prefix: str, *, recursive: bool) -> list[dict[str, Any]]:
        base = f"{prefix}/" if prefix else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for f in repo.files.values():
            if not f.path.startswith(base):
                continue
            parts = f.path[len(base) :].split("/")
            for depth in range(1, len(parts)):
                if depth > 1 and not recursive:
                    break
                folder = base + "/".join(parts[:depth])
                if folder not in folders:
                    folders.add(folder)
                    oid = hashlib.sha1(folder.encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries.append(f.tree_entry())
        return entries

    # -- files -----------------------------------------------------------------------------

    def _resolve(self, repo: HubRepo, revision: str, filename: str) -> None:
        self.entry.filename = filename
        if self._injected_status(filename):
            return None
        commit = self._commit_or_404(repo, revision)
        if commit is None:
            return None
        hub_file = repo.files.get(filename)
        if hub_file is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit=commit)
        if repo.gated and not self._gate(repo):
            return None
        if hub_file.lfs:
            self.send_response(302)
            self.send_header("Location", self.hub._blob_url(repo, hub_file))
            self.send_header("ETag", f'"{hub_file.sha256}"')
            self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
            self.send_header("X-Linked-Size", str(hub_file.size))
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.entry.status = 302
            return None
        return self._send_file(repo, hub_file)

    def _blob(self, repo: HubRepo, tail: str) -> None:
        self.entry.repo_id = repo.repo_id
        name = self.query.get("path", [""])[0]
        hub_file = repo.files.get(name)
        self.entry.filename = name or None
        if self._injected_status(name):
            return None
        if hub_file is None or tail.strip("/") != hub_file.sha256:
            return self._error(404, "EntryNotFound", "Entry not found")
        if not hmac.compare_digest(
            self.query.get("sig", [""])[0], self.hub._blob_sig(repo, hub_file)
        ):
            return self._error(403, None, "Invalid or expired signature")
        return self._send_file(repo, hub_file)

    def _send_file(self, repo: HubRepo, hub_file: HubFile) -> None:
        size = hub_file.size
        start, end = 0, size - 1
        status = 200
        if self.entry.range:
            parsed = _parse_range(self.entry.range, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.entry.status = 416
                return
            start, end = parsed
            status = 206
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hub_file.etag}"')
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Content-Disposition", f'inline; filename="{Path(hub_file.path).name}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self.entry.status = status
        if self.command == "HEAD":
            return
        faults = self.hub.faults
        drop = faults._take("drop", self.entry, hub_file.path)
        corrupt_at = faults._corrupt_offset(hub_file)
        sent = 0
        with open(hub_file.local, "rb") as fh:
            fh.seek(start)
            while sent < length:
                want = min(faults._chunk_size(self.entry.identity), length - sent)
                if drop is not None:
                    want = min(want, max(0, drop.after_bytes - sent))
                    if want == 0:
                        self.entry.dropped = True
                        self.close_connection = True
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)
                        return
                chunk = fh.read(want)
                if not chunk:
                    break
                pos = start + sent
                if corrupt_at is not None and pos <= corrupt_at < pos + len(chunk):
                    buf = bytearray(chunk)
                    buf[corrupt_at - pos] ^= 0xFF
                    chunk = bytes(buf)
                faults._throttle(self.entry.identity, len(chunk))
                self.wfile.write(chunk)
                sent += len(chunk)
                self.entry.bytes_sent = sent

    # -- responses -------------------------------------------------------------------------

    def _injected_status(self, filename: str | None) -> bool:
        fault = self.hub.faults._take("status", self.entry, filename)
        if fault is None:
            return False
        extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        self._error(fault.status, None, f"Injected error {fault.status}", extra=extra)
        return True

    def _commit_or_404(self, repo: HubRepo, revision: str) -> str | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _gate(self, repo: HubRepo) -> bool:
        if self.entry.authorized:
            return True
        if self.headers.get("Authorization"):
            message = f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
            self._error(403, "GatedRepo", message)
        else:
            message = (
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in."
            )
            self._error(401, "GatedRepo", message)
        return False

    def _json(self, data: object) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.entry.status = 200
        if self.command != "HEAD":
            self.wfile.write(payload)
            self.entry.bytes_sent = len(payload)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        commit: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.entry.status = status
        if self.command != "HEAD":
            self.wfile.write(payload)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """First range of a ``bytes=`` header as (start, end) inclusive, end clamped to the file.

    None when it cannot be satisfied (start past the end); a malformed header serves everything.
    """
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*(,.*)?", header)
    if not match or (not match.group(1) and not match.group(2)):
        return 0, size - 1
    first, last = match.group(1), match.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
