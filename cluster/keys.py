"""API key files: one reader, one contract, for the server, the controller and the clients.

A key file holds one key per line; blank lines and ``#`` comments are ignored; it must be readable
by its owner only (like an SSH key), and it must hold at least one key. The server accepts every
key in it; a client sends the first.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cluster.errors import ConfigError


class KeyFileError(ConfigError, ValueError):
    """A key file that cannot be used (missing, readable by others, empty); a ValueError too, so
    pydantic validators report it as a field error (with the hint in its text)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.args = (self.one_line(),)


def read_api_keys(path: str | Path) -> list[str]:
    """Every key in the key file at ``path`` (see the module docstring for the contract)."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(
            f"API key file {path} does not exist", hint="create it with mode 0600, one key a line"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read API key file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"API key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o})",
            hint=f"run `chmod 600 {path}`",
        )
    keys = [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    if not keys:
        raise KeyFileError(f"API key file {path} holds no key", hint="put one key per line")
    return keys


def read_api_key(path: str | Path) -> str:
    """The key a client sends: the first one in the key file at ``path``."""
    return read_api_keys(path)[0]
