"""Download errors with the fields a person needs: which file, which node, expected vs found."""

from __future__ import annotations

import errno
import re

from cluster.errors import DownloadError

# ENOSPC and EDQUOT as OSError numbers, and as they read in messages from code that only gives
# text (hf_transfer, a Rust library, says "No space left on device (os error 28)").
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = re.compile(
    rf"no space left on device|disk quota exceeded|os error ({errno.ENOSPC}|{errno.EDQUOT})\b",
    re.IGNORECASE,
)


class AccessDeniedError(DownloadError):
    """The hub refused access (gated or private repository, or a bad token): retrying cannot help."""


class ChecksumMismatchError(DownloadError):
    """A fetched or stored file does not hash to what the hub (or the manifest) says."""

    def __init__(self, path: str, *, expected: str, found: str, hint: str | None = None) -> None:
        super().__init__(
            f"{path}: checksum mismatch (expected {expected[:16]}..., found {found[:16]}...)",
            hint=hint,
        )
        self.path = path
        self.expected = expected
        self.found = found


def model_page_url(repo: str) -> str:
    """The repository's page on the hub this process talks to (HF_ENDPOINT honoured)."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo}"


def access_error(repo: str, *, status: int | None, token_given: bool) -> AccessDeniedError:
    """The one-line error for 401/403/404 on a repository: where to accept terms, which token."""
    page = model_page_url(repo)
    what = f"HTTP {status}" if status else "access denied"
    if token_given:
        hint = (
            f"the token in HF_TOKEN has no read access: accept the model's terms at {page} "
            "with that account, or use a token that can read it"
        )
    else:
        hint = f"accept the model's terms at {page}, then set HF_TOKEN to a read token and re-run"
    return AccessDeniedError(
        f"the hub refused {repo} ({what}: gated, private or missing repository)", hint=hint
    )


class DiskFullError(DownloadError):
    """The model directory's filesystem is full (ENOSPC) or the quota is spent (EDQUOT):
    retrying cannot help, so the download stops at once."""

    def __init__(self, message: str, *, node: str, path: str, needed: int, free: int | None):
        super().__init__(
            message, hint="free space there (or raise the quota), or pick another --target"
        )
        self.node = node
        self.path = path
        self.needed = needed
        self.free = free


def is_disk_full(exc: BaseException | str) -> bool:
    """True for ENOSPC/EDQUOT: an OSError anywhere in the cause chain, or the same in a message."""
    if isinstance(exc, str):
        return _DISK_FULL_TEXT.search(exc) is not None
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(cur)):
            return True
        cur = cur.__cause__ or cur.__context__
    return False
