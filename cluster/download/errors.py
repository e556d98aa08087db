"""Download errors with the fields a person needs: which file, which node, expected vs found."""

from __future__ import annotations

from cluster.errors import DownloadError


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
