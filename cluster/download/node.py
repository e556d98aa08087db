"""Node side of the download: fetch, verify, record, warm; JSON lines on stdout for the controller.

Run as ``python -m cluster.download.node`` with one JSON request (a ``NodeRequest``) on stdin. The
HF token, if any, comes in the environment (``HF_TOKEN``), never on the command line or stdin.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from cluster.download.errors import (
    AccessDeniedError,
    ChecksumMismatchError,
    DiskFullError,
    access_error,
    is_disk_full,
)
from cluster.download.lease import (
    DownloadBusyError,
    Lease,
    acquire_lease,
    release_lease,
    renew_lease,
)
from cluster.download.manifest import remove_manifest, write_manifest
from cluster.download.plan import DownloadPlan, RepoFile, check_repo_paths
from cluster.download.prepare import free_bytes, prepare_target
from cluster.download.records import (
    RecordEntry,
    append_record,
    check_node_name,
    hash_file,
    read_records,
    record_path,
    remove_stale_temps,
    staging_dir,
    temp_path,
    verified_entry,
)
from cluster.errors import DownloadError, LlamaclusterError
from cluster.files import fsync_dir

Downloader = Literal["hf_transfer", "hub"]
USER_AGENT_KEY = "llamacluster-node"  # the hub sees "llamacluster-node/<name>" in the User-Agent
PROGRESS_INTERVAL_S = 0.25
MAX_RETRY_WAIT_S = 120.0
TRANSFER_CHILD = Path(__file__).with_name("transfer_child.py")


class FetchSettings(BaseModel):
    """How a node fetches: downloader, parallelism and retry policy."""

    downloader: Downloader = Field(
        default="hf_transfer",
        description="hf_transfer (parallel ranged GETs) or huggingface_hub's own downloader.",
    )
    jobs: int = Field(default=2, ge=1, le=32, description="Files fetched at once on this node.")
    connections: int = Field(
        default=8, ge=1, le=64, description="hf_transfer connections per file."
    )
    chunk_mb: int = Field(default=10, ge=1, le=256, description="hf_transfer chunk size in MiB.")
    inline_max_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        description="hf_transfer runs in-process up to this size (a child costs more), "
        "in a child process per file above it (it holds the GIL while it runs).",
    )
    max_attempts: int = Field(default=6, ge=1, le=50, description="Attempts per file.")
    backoff_s: float = Field(
        default=1.0, ge=0, le=60, description="First backoff; doubles per attempt (jittered)."
    )
    stall_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="A transfer child that moves no byte for this long is killed and the file "
        "retried; 0 turns the watchdog off.",
    )


class NodeRequest(BaseModel):
    """What the controller sends one node on stdin."""

    action: Literal["acquire", "renew", "release", "fetch", "finalize", "warm"] = Field(
        description="What to do: take, renew or give back the directory's lease (head only), "
        "fetch this node's share, write the manifest, or warm the page cache."
    )
    node: str | None = Field(
        default=None, description="This node's name; `--node` on the command line overrides it."
    )
    target: str = Field(description="The model directory on the shared filesystem.")
    plan: DownloadPlan | None = Field(default=None, description="The plan (fetch, finalize).")
    settings: FetchSettings = Field(default_factory=FetchSettings, description="Fetch settings.")
    warm_files: dict[str, list[str]] = Field(
        default_factory=dict, description="Files each node reads (warm), by node name."
    )
    lease: Lease | None = Field(
        default=None, description="The controller's claim on the directory (lease actions)."
    )
    wait: bool = Field(
        default=False, description="acquire: queue behind a live lease instead of failing."
    )


class Emitter:
    """Writes one JSON object per line to stdout; thread-safe; throttles progress lines."""

    def __init__(self, node: str, stream: Any = None) -> None:
        self.node = node
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._last_progress: dict[str, float] = {}

    def emit(self, event: str, **fields: Any) -> None:
        """Send one event."""
        line = json.dumps({"event": event, "node": self.node, **fields}, separators=(",", ":"))
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                # The controller is gone (killed, connection dropped): stop at once. Unfinished
                # files stay under their hidden temp names; the next run removes them.
                os._exit(141)

    def progress(self, path: str, done: int, *, force: bool = False) -> None:
        """Bytes done of one file so far (absolute), at most every PROGRESS_INTERVAL_S."""
        now = time.monotonic()
        if not force and now - self._last_progress.get(path, 0.0) < PROGRESS_INTERVAL_S:
            return
        self._last_progress[path] = now
        self.emit("progress", path=path, done=done)


class HfTransferFailed(Exception):
    """hf_transfer gave up on a file (after retrying its chunks itself)."""


class RetryableError(Exception):
    """A failure worth another attempt; ``wait_s`` is the server's Retry-After when it sent one."""

    def __init__(self, message: str, *, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s


def _http_response(exc: BaseException) -> Any:
    """The HTTP response behind an exception, following the cause chain (or None)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if response is not None and hasattr(response, "status_code"):
            return response
        cur = cur.__cause__ or cur.__context__
    return None


def _retry_after_s(response: Any) -> float | None:
    value = response.headers.get("Retry-After") if response is not None else None
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_WAIT_S)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def classify_error(exc: BaseException, *, repo: str, token_given: bool) -> Exception:
    """Map a downloader exception to AccessDeniedError (fatal) or RetryableError."""
    if isinstance(exc, LlamaclusterError | RetryableError):
        return exc
    response = _http_response(exc)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return access_error(repo, status=status, token_given=token_given)
    if status == 404:
        return DownloadError(f"the hub has no such file: {exc}".splitlines()[0])
    reason = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}".splitlines()[0]
    return RetryableError(reason, wait_s=_retry_after_s(response))


def backoff_s(attempt: int, *, base: float) -> float:
    """Exponential backoff with jitter for attempt 1, 2, ... (capped at 30 s)."""
    return min(base * 2 ** (attempt - 1), 30.0) * (0.75 + random.random() / 2)


def _progress_bar_class(on_total: Callable[[int], None]) -> type:
    """A silent huggingface_hub progress bar that reports bytes to ``on_total``."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _ReportingBar(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True  # stdout carries JSON only; stderr stays quiet
            super().__init__(*args, **kwargs)
            self._llc_done = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self._llc_done += int(n or 0)
            on_total(self._llc_done)
            return super().update(n)

    return _ReportingBar


class NodeFetcher:
    """Fetches one node's share of a plan into the target directory, one verified file at a time."""

    def __init__(self, request: NodeRequest, emitter: Emitter, *, token: str | None = None) -> None:
        if request.plan is None:
            raise DownloadError("fetch request without a plan")
        if request.node is None:
            raise DownloadError("fetch request without a node name")
        self.plan: DownloadPlan = request.plan
        self.node = check_node_name(request.node)
        self.target = Path(request.target)
        # The controller checked the names already; a node never trusts its input to stay inside
        # the model directory.
        check_repo_paths(self.plan.repo, (f.path for f in self.plan.files))
        self.settings = request.settings
        self.emitter = emitter
        self.token = token
        # The head drops a stale manifest first: serving must not start while files change.
        self.is_head = self.plan.nodes[0].node == self.node
        self._dirs_touched: set[Path] = set()

    # -- hub access -------------------------------------------------------------------------
    def _url(self, f: RepoFile) -> str:
        from huggingface_hub import constants, hf_hub_url

        return hf_hub_url(
            self.plan.repo, f.path, revision=self.plan.commit, endpoint=constants.ENDPOINT
        )

    def _user_agent(self) -> dict[str, str]:
        return {USER_AGENT_KEY: self.node}

    def _fetch_hf_transfer(self, f: RepoFile, tmp: Path) -> None:
        from huggingface_hub import get_hf_file_metadata
        from huggingface_hub.utils import build_hf_headers

        url = self._url(f)
        # HEAD through huggingface_hub: resolves redirects, and its errors carry the status and
        # Retry-After, which hf_transfer's own errors do not.
        meta = get_hf_file_metadata(url, token=self.token, user_agent=self._user_agent())
        if meta.size is not None and meta.size != f.size:
            raise DownloadError(f"{f.path}: hub says {meta.size} bytes, plan says {f.size}")
        headers = build_hf_headers(token=self.token, user_agent=self._user_agent())
        location = meta.location
        if urlsplit(location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a pre-signed CDN URL must not get the token
        job = {
            "url": location,
            "filename": str(tmp),
            "max_files": self.settings.connections,
            "chunk_size": self.settings.chunk_mb * 1024 * 1024,
            "parallel_failures": min(3, self.settings.connections),
            "max_retries": 3,
            "headers": headers,
        }
        if f.size <= self.settings.inline_max_bytes:
            self._transfer_inline(f, job)
        else:
            self._transfer_in_child(f, {**job, "parent_pid": os.getpid()})

    def _transfer_inline(self, f: RepoFile, job: dict[str, Any]) -> None:
        """Small files: hf_transfer in this process (the GIL is held only for a moment)."""
        import hf_transfer

        try:
            hf_transfer.download(**job)
        except Exception as exc:
            if is_disk_full(exc):
                raise self._disk_full(f, str(exc)) from exc
            raise HfTransferFailed(f"{type(exc).__name__}: {exc}") from exc
        self.emitter.progress(f.path, f.size)

    def _transfer_in_child(self, f: RepoFile, job: dict[str, Any]) -> None:
        """Large files: hf_transfer keeps the GIL for the whole transfer, so in-process files
        would move one after another and progress would stall; one child process per file.

        A child that moves no byte for ``stall_timeout_s`` (a connection hung without an error)
        is killed, by the pid this process started, and the file is retried.
        """
        proc = subprocess.Popen(
            [sys.executable, str(TRANSFER_CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr
        last_change = [time.monotonic()]
        err_text: list[str] = []

        def pump_stdout() -> None:
            for line in stdout:
                if line.strip().isdigit():
                    last_change[0] = time.monotonic()
                    self.emitter.progress(f.path, int(line))

        readers = [
            threading.Thread(target=pump_stdout, daemon=True),
            threading.Thread(target=lambda: err_text.append(stderr.read()), daemon=True),
        ]
        stall_s = self.settings.stall_timeout_s
        stalled = False
        try:
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            for t in readers:
                t.start()
            written = _bytes_on_disk(Path(job["filename"]))
            while True:
                try:
                    code = proc.wait(timeout=min(1.0, stall_s / 4) if stall_s else None)
                    break
                except subprocess.TimeoutExpired:
                    # hf_transfer reports whole chunks only; bytes landing in the file count too.
                    now_written = _bytes_on_disk(Path(job["filename"]))
                    if now_written != written:
                        written, last_change[0] = now_written, time.monotonic()
                    if time.monotonic() - last_change[0] > stall_s:
                        stalled = True
                        proc.kill()  # our own child, by its pid (Popen keeps it)
                        code = proc.wait()
                        break
            for t in readers:
                t.join(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = "".join(err_text)
        if stalled:
            raise TransferStalled(
                f"no progress for {stall_s:g} s: transfer process {proc.pid} killed",
            )
        if code == 127 or "No module named 'hf_transfer'" in err:
            raise ImportError(err.strip() or "hf_transfer is not installed")
        if code != 0:
            if is_disk_full(err):
                raise self._disk_full(f, err.strip().splitlines()[-1])
            raise HfTransferFailed(err.strip().splitlines()[-1] if err.strip() else f"exit {code}")

    def _disk_full(self, f: RepoFile, cause: str) -> DiskFullError:
        """The one fatal line for ENOSPC/EDQUOT: node, path, bytes needed, bytes free."""
        from cluster.download.progress import format_bytes

        path = self.target / f.path
        free = free_bytes(self.target)
        shown = "unknown" if free is None else format_bytes(free)
        return DiskFullError(
            f"node {self.node}: no space left writing {path} (needs {format_bytes(f.size)}, "
            f"{shown} free in {self.target}; {cause.strip()[:120]})",
            node=self.node,
            path=str(path),
            needed=f.size,
            free=free,
        )

    def _fetch_hub(self, f: RepoFile, tmp: Path) -> None:
        from huggingface_hub import hf_hub_download

        staging = staging_dir(self.target, self.node)
        staging.mkdir(parents=True, exist_ok=True)
        try:
            local = hf_hub_download(
                self.plan.repo,
                f.path,
                revision=self.plan.commit,
                local_dir=staging,
                token=self.token,
                user_agent=self._user_agent(),
                force_download=True,
                tqdm_class=_progress_bar_class(lambda n: self.emitter.progress(f.path, n)),
            )
            os.replace(local, tmp)  # same filesystem: staging lives inside the target
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- one file ---------------------------------------------------------------------------
    def _verify(self, f: RepoFile, tmp: Path) -> str:
        size = tmp.stat().st_size
        if size != f.size:
            raise ChecksumMismatchError(f.path, expected=f"size {f.size}", found=f"size {size}")
        sha256, sha1 = hash_file(tmp, git_blob=f.sha256 is None and f.git_sha1 is not None)
        if f.sha256 is not None and sha256 != f.sha256:
            raise ChecksumMismatchError(f.path, expected=f.sha256, found=sha256)
        if f.sha256 is None and f.git_sha1 is not None and sha1 != f.git_sha1:
            raise ChecksumMismatchError(f.path, expected=f.git_sha1, found=sha1 or "")
        return sha256

    def _install(self, f: RepoFile, tmp: Path, sha256: str) -> None:
        final = self.target / f.path
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        # No fsync of the folder or the record per file: a rename or record line lost in a crash
        # only makes the next run fetch that file again (the record is checked against the file).
        # The data itself is fsync'd above, so a name never points at unwritten bytes.
        self._dirs_touched.add(final.parent)
        st = final.stat()
        append_record(
            self.target,
            RecordEntry(
                path=f.path,
                size=st.st_size,
                sha256=sha256,
                checksum_id=f.checksum_id,
                mtime_ns=st.st_mtime_ns,
                node=self.node,
                commit=self.plan.commit,
            ),
        )

    def fetch_file(self, f: RepoFile) -> str:
        """Fetch, verify and install one file, retrying what is worth retrying; its sha256."""
        downloader: Downloader = self.settings.downloader
        final = self.target / f.path
        final.parent.mkdir(parents=True, exist_ok=True)
        self.emitter.emit("file_start", path=f.path, size=f.size, downloader=downloader)
        attempt = 0
        while True:
            attempt += 1
            tmp = temp_path(final, self.node)
            try:
                if downloader == "hf_transfer":
                    try:
                        self._fetch_hf_transfer(f, tmp)
                    except ImportError as exc:
                        raise _Fallback(f"hf_transfer not importable: {exc}") from exc
                    except (DownloadError, TransferStalled):
                        raise
                    except Exception as exc:
                        if is_disk_full(exc):
                            raise self._disk_full(f, str(exc)) from exc
                        classified = classify_error(
                            exc, repo=self.plan.repo, token_given=bool(self.token)
                        )
                        if _http_response(exc) is None and not isinstance(
                            classified, LlamaclusterError
                        ):
                            # hf_transfer's own failure (it retried chunks already): switch.
                            raise _Fallback(str(classified)) from exc
                        raise classified from exc
                else:
                    self._fetch_hub(f, tmp)
                sha256 = self._verify(f, tmp)
                self._install(f, tmp, sha256)
                self.emitter.progress(f.path, f.size, force=True)
                return sha256
            except _Fallback as fb:
                downloader = "hub"
                self.emitter.emit("fallback", path=f.path, reason=str(fb), downloader=downloader)
                attempt -= 1  # the switch itself is not a failed attempt of the file
                continue
            except AccessDeniedError:
                raise
            except TransferStalled as exc:
                error = exc
                wait = backoff_s(attempt, base=self.settings.backoff_s)
            except ChecksumMismatchError as exc:
                error: Exception = exc
                wait = backoff_s(attempt, base=self.settings.backoff_s)
            except DownloadError:
                raise
            except Exception as exc:
                if is_disk_full(exc):  # the hub downloader, the rename or the record
                    raise self._disk_full(f, str(exc)) from exc
                error = classify_error(exc, repo=self.plan.repo, token_given=bool(self.token))
                if isinstance(error, LlamaclusterError):
                    raise error from exc
                wait = getattr(error, "wait_s", None)
                if wait is None:
                    wait = backoff_s(attempt, base=self.settings.backoff_s)
            finally:
                tmp.unlink(missing_ok=True)
            if attempt >= self.settings.max_attempts:
                if isinstance(error, ChecksumMismatchError):
                    error.hint = "the hub kept serving bad bytes; re-run later"
                    raise error
                raise DownloadError(
                    f"{f.path}: giving up after {attempt} attempts ({error})",
                    hint="re-run the same command later: verified files are kept",
                )
            self.emitter.emit(
                "retry", path=f.path, attempt=attempt, wait_s=round(wait, 2), reason=str(error)
            )
            time.sleep(wait)

    # -- the node's share ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Fetch every file of this node's assignment that is not yet verified."""
        started = time.monotonic()
        mine = self.plan.assignment(self.node).files
        self.target.mkdir(parents=True, exist_ok=True)
        if self.is_head:
            remove_manifest(self.target)
        removed = remove_stale_temps(self.target, self.node)
        records = read_records(self.target)
        todo: list[RepoFile] = []
        skipped = 0
        self.emitter.emit(
            "start",
            files=len(mine),
            bytes=sum(f.size for f in mine),
            stale_removed=len(removed),
        )
        for f in mine:
            entry = verified_entry(self.target, f, records)
            if entry is not None:
                skipped += 1
                self.emitter.emit(
                    "file_done", path=f.path, size=f.size, sha256=entry.sha256, skipped=True
                )
            else:
                todo.append(f)
        failures: list[Exception] = []
        stop = threading.Event()

        def work(f: RepoFile) -> None:
            if stop.is_set():
                return
            try:
                sha256 = self.fetch_file(f)
            except Exception as exc:
                if isinstance(exc, AccessDeniedError | DiskFullError):
                    stop.set()  # fatal for every file: do not start the others
                failures.append(exc)
                self.emitter.emit("error", path=f.path, **_error_fields(exc))
                return
            self.emitter.emit("file_done", path=f.path, size=f.size, sha256=sha256, skipped=False)

        # Largest first, so the long transfers overlap the short ones.
        with ThreadPoolExecutor(max_workers=self.settings.jobs) as pool:
            list(pool.map(work, sorted(todo, key=lambda f: (-f.size, f.path))))
        for d in sorted(self._dirs_touched):
            fsync_dir(d)
        own_record = record_path(self.target, self.node)
        if own_record.exists():
            with open(own_record, "rb") as fh:
                os.fsync(fh.fileno())
        summary = {
            "fetched": len(todo) - len(failures),
            "skipped": skipped,
            "failed": len(failures),
            "bytes": sum(f.size for f in todo),
            "seconds": round(time.monotonic() - started, 3),
        }
        if failures:
            access = [e for e in failures if isinstance(e, AccessDeniedError | DiskFullError)]
            first = access[0] if access else failures[0]
            if isinstance(first, LlamaclusterError):
                raise first
            raise DownloadError(str(first))
        return summary


class TransferStalled(RetryableError):
    """A transfer child moved no byte for the stall timeout and was killed: retry the file."""


def _bytes_on_disk(path: Path) -> int:
    """Allocated bytes of a file being written (0 when it does not exist yet)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return st.st_blocks * 512 + st.st_size


class _Fallback(Exception):
    """hf_transfer failed in a way huggingface_hub's downloader may not: switch downloaders."""


def _error_fields(exc: BaseException) -> dict[str, Any]:
    kind = (
        "access"
        if isinstance(exc, AccessDeniedError)
        else "busy"
        if isinstance(exc, DownloadBusyError)
        else "disk"
        if isinstance(exc, DiskFullError)
        else "checksum"
        if isinstance(exc, ChecksumMismatchError)
        else "fatal"
    )
    if isinstance(exc, LlamaclusterError):
        return {"kind": kind, "message": exc.message, "hint": exc.hint}
    return {"kind": kind, "message": f"{type(exc).__name__}: {exc}", "hint": None}


def warm_files(target: Path, paths: list[str], emitter: Emitter, *, jobs: int = 4) -> int:
    """Read files once so the page cache holds them before the engine starts; bytes read."""
    total = 0
    lock = threading.Lock()

    def read(path: str) -> None:
        nonlocal total
        n = 0
        with open(target / path, "rb", buffering=0) as fh:
            while chunk := fh.read(8 * 1024 * 1024):
                n += len(chunk)
                emitter.progress(path, n)
        with lock:
            total += n
        emitter.emit("file_done", path=path, size=n, skipped=False, warm=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(read, paths))
    return total


def handle(request: NodeRequest, emitter: Emitter, *, token: str | None) -> dict[str, Any]:
    """Run one request; the summary dict goes into the final ``done`` event."""
    target = Path(request.target)
    if request.action in ("acquire", "renew", "release"):
        return _lease_action(request, emitter)
    if request.action == "fetch":
        return NodeFetcher(request, emitter, token=token).run()
    if request.action == "finalize":
        if request.plan is None:
            raise DownloadError("finalize request without a plan")
        manifest = write_manifest(target, request.plan)
        return {
            "files": len(manifest.files),
            "bytes": manifest.total_bytes,
            "manifest": manifest.model_dump(mode="json"),
        }
    started = time.monotonic()
    paths = request.warm_files.get(request.node or "", [])
    n = warm_files(target, paths, emitter, jobs=request.settings.jobs * 2)
    return {"bytes": n, "seconds": round(time.monotonic() - started, 3)}


def _lease_action(request: NodeRequest, emitter: Emitter) -> dict[str, Any]:
    """Take (and check the directory for), renew or give back the model directory's lease."""
    if request.lease is None:
        raise DownloadError(f"{request.action} request without a lease")
    target = Path(request.target)
    if request.action == "renew":
        renewed = renew_lease(target, request.lease)
        return {"held": renewed is not None, "expires_at": renewed.expires_at if renewed else None}
    if request.action == "release":
        return {"released": release_lease(target, request.lease)}
    if request.plan is None:
        raise DownloadError("acquire request without a plan")
    check_repo_paths(request.plan.repo, (f.path for f in request.plan.files))
    lease = acquire_lease(
        target,
        request.lease,
        wait=request.wait,
        on_wait=lambda line: emitter.emit("waiting", message=line),
    )
    try:
        summary = prepare_target(target, request.plan, node=request.node or "?")
    except BaseException:
        release_lease(target, lease)
        raise
    return {"lease": lease.model_dump(mode="json"), **summary}


def main(argv: list[str] | None = None) -> int:
    """Entry point: one request on stdin, JSON lines on stdout, exit 0 or the error's code."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.download.node")
    parser.add_argument("--node", help="this node's name (overrides the request's)")
    args = parser.parse_args(argv)
    raw = sys.stdin.read()
    try:
        request = NodeRequest.model_validate_json(raw)
        if args.node:
            request = request.model_copy(update={"node": check_node_name(args.node)})
    except (ValueError, LlamaclusterError) as exc:
        line = {"event": "failed", "kind": "fatal", "message": f"bad request: {exc}"}
        print(json.dumps(line), flush=True)
        return 3
    emitter = Emitter(request.node or "?")
    token = os.environ.get("HF_TOKEN") or None
    try:
        summary = handle(request, emitter, token=token)
    except LlamaclusterError as exc:
        if os.environ.get("LLAMACLUSTER_DEBUG"):
            raise
        emitter.emit("failed", **_error_fields(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    emitter.emit("done", action=request.action, **summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
