"""API key files: one reader, one contract, for the server, the controller and the clients.

A key file holds one key per line; blank lines and ``#`` comments are ignored; it must be readable
by its owner only (like an SSH key), and it must hold at least one key. The server accepts every
key in it; a client sends the first.

Names and creation times (``llamacluster keys``) live in a sidecar next to it,
``<key file>.meta.json`` (0600), which maps each key's SHA-256 (never the key) to its name and
creation time, so the key file itself stays a plain list that ``cat`` and every older reader
understand. A key the sidecar does not know (a hand-written file) is named ``key-N`` by its
position until the next edit writes the names down. Edits hold a lock next to the file and
replace both files atomically (temp file, rename, 0600); comment lines and the order of the
other keys are kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster.errors import ConfigError
from cluster.files import atomic_write

KEY_PREFIX = "sk-lc-"
"""How every generated key starts (also the prefix of the key `up` creates)."""
KEY_BYTES = 32
"""Random bytes in a generated key (hex in the key)."""
META_SUFFIX = ".meta.json"
"""The sidecar with the keys' names and creation times: ``<key file>.meta.json``."""
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FINGERPRINT_CHARS = 12
"""Hex digits of a key's SHA-256 that `keys list` shows."""


class KeyFileError(ConfigError, ValueError):
    """A key file that cannot be used (missing, readable by others, empty); a ValueError too, so
    pydantic validators report it as a field error (with the hint in its text)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.args = (self.one_line(),)


def _read_private(path: Path) -> str:
    """The text of the key file at ``path``; a missing or open (group/other) file is refused."""
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
    return text


def _is_key_line(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def keys_in_text(text: str) -> list[str]:
    """The keys of a key file's text, in order (blank lines and ``#`` comments skipped)."""
    return [line.strip() for line in text.splitlines() if _is_key_line(line)]


def read_api_keys(path: str | Path) -> list[str]:
    """Every key in the key file at ``path`` (see the module docstring for the contract)."""
    path = Path(path).expanduser()
    keys = keys_in_text(_read_private(path))
    if not keys:
        raise KeyFileError(f"API key file {path} holds no key", hint="put one key per line")
    return keys


def read_api_key(path: str | Path) -> str:
    """The key a client sends: the first one in the key file at ``path``."""
    return read_api_keys(path)[0]


# ------------------------------------------------------------------ named keys (keys command)


def key_sha256(secret: str) -> str:
    """A key's SHA-256 in hex: the server's digest of it (serve.api.key_digest), as text."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh random key: ``sk-lc-`` and 32 random bytes in hex."""
    return KEY_PREFIX + secrets.token_hex(KEY_BYTES)


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the second (what the sidecar records as a creation time)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ApiKey:
    """One key of a key file: its name, the secret (never in a repr), when it was created."""

    name: str
    secret: str = field(repr=False)
    created: str | None = None

    @property
    def fingerprint(self) -> str:
        """The first hex digits of the key's SHA-256: enough to tell keys apart, safe to show."""
        return key_sha256(self.secret)[:FINGERPRINT_CHARS]


@dataclass(frozen=True)
class KeyRing:
    """A key file's text and its sidecar's records, read together; edits return a new ring."""

    text: str
    meta: dict[str, dict[str, str]]  # sha256 hex -> {"name": ..., "created": ...}

    @property
    def keys(self) -> list[ApiKey]:
        """Every key in file order, each with its name (recorded, else ``key-N``)."""
        found: list[ApiKey] = []
        for i, secret in enumerate(dict.fromkeys(keys_in_text(self.text)), start=1):
            # a secret written twice is one key
            record = self.meta.get(key_sha256(secret), {})
            found.append(ApiKey(record.get("name") or f"key-{i}", secret, record.get("created")))
        return found

    def find(self, name: str) -> ApiKey:
        """The key called ``name``; a one-line error listing the names there are."""
        for key in self.keys:
            if key.name == name:
                return key
        names = ", ".join(k.name for k in self.keys) or "none"
        raise ConfigError(
            f"no API key named {name!r}",
            hint=f"the keys are: {names} (see `llamacluster keys list`)",
        )

    def check_names(self) -> None:
        """Refuse a ring where two keys share a name (a hand-edited sidecar)."""
        seen: set[str] = set()
        for key in self.keys:
            if key.name in seen:
                raise ConfigError(
                    f"two API keys are named {key.name!r}",
                    hint="revoke one of them by hand from the key file, or rename it in the "
                    f"{META_SUFFIX} sidecar",
                )
            seen.add(key.name)

    def _recorded(self, keys: list[ApiKey]) -> dict[str, dict[str, str]]:
        """Sidecar records for ``keys`` (every key named, so positions never rename one)."""
        meta: dict[str, dict[str, str]] = {}
        for key in keys:
            record = {"name": key.name}
            if key.created:
                record["created"] = key.created
            meta[key_sha256(key.secret)] = record
        return meta

    def added(self, name: str, secret: str, created: str) -> KeyRing:
        """This ring with ``secret`` appended as ``name`` (a client keeps sending the first)."""
        check_name(name)
        if any(k.name == name for k in self.keys):
            raise ConfigError(
                f"an API key named {name!r} exists already",
                hint=f"pick another name, or `llamacluster keys rotate {name}` for a new secret",
            )
        text = self.text if not self.text or self.text.endswith("\n") else self.text + "\n"
        return KeyRing(
            text + secret + "\n", self._recorded([*self.keys, ApiKey(name, secret, created)])
        )

    def revoked(self, name: str) -> KeyRing:
        """This ring without the key ``name``; the last key is never removed."""
        target = self.find(name)
        if len(self.keys) == 1:
            raise ConfigError(
                f"{name!r} is the only API key: revoking it would lock every client out",
                hint=f"add another first (`llamacluster keys add NAME`), or `llamacluster keys "
                f"rotate {name}` to replace its secret",
            )
        keep = [k for k in self.keys if k.name != name]
        return KeyRing(self._edit_line(target.secret, None), self._recorded(keep))

    def rotated(self, name: str, secret: str, created: str) -> KeyRing:
        """This ring with the key ``name`` given ``secret`` in its place (same name, position)."""
        target = self.find(name)
        keys = [
            replace(k, secret=secret, created=created) if k.name == name else k for k in self.keys
        ]
        return KeyRing(self._edit_line(target.secret, secret), self._recorded(keys))

    def _edit_line(self, old: str, new: str | None) -> str:
        """The text with every line holding ``old`` replaced by ``new`` (or dropped); every
        other line (comments, blank lines, other keys) kept as it was."""
        out: list[str] = []
        for line in self.text.splitlines(keepends=True):
            if _is_key_line(line) and line.strip() == old:
                if new is not None:
                    out.append(new + "\n")
                continue
            out.append(line)
        return "".join(out)


def check_name(name: str) -> str:
    """A key name: letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit."""
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{name!r} is not a usable key name",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def meta_path(path: str | Path) -> Path:
    """The sidecar of the key file at ``path``."""
    path = Path(path)
    return path.with_name(path.name + META_SUFFIX)


def _read_meta(path: Path) -> dict[str, dict[str, str]]:
    """The sidecar's records (empty when there is none); a broken one is an error to fix."""
    meta = meta_path(path)
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the key names in {meta}: {exc}",
            hint="fix or delete that file (the keys stay valid; they are named key-N again)",
        ) from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict):
        return {}
    return {
        str(digest): {k: str(v) for k, v in record.items() if k in ("name", "created")}
        for digest, record in keys.items()
        if isinstance(record, dict)
    }


def load_key_ring(path: str | Path, *, missing_ok: bool = False) -> KeyRing:
    """The key file at ``path`` with its names (an empty ring for a missing file when
    ``missing_ok``: `keys add` may create one)."""
    path = Path(path).expanduser()
    if missing_ok and not path.exists():
        return KeyRing("", {})
    ring = KeyRing(_read_private(path), _read_meta(path))
    ring.check_names()
    return ring


def save_key_ring(path: str | Path, ring: KeyRing, *, previous: KeyRing | None = None) -> None:
    """Write ``ring`` to the key file at ``path`` and its sidecar, each atomically and 0600.

    The sidecar first holds the names of both the old and the new keys, then the key file is
    replaced, then the sidecar is trimmed: a crash at any point leaves every key in the file
    with its name.
    """
    path = Path(path).expanduser()
    if previous is not None:
        atomic_write(meta_path(path), _meta_text({**previous.meta, **ring.meta}), mode=0o600)
    atomic_write(path, ring.text, mode=0o600)
    atomic_write(meta_path(path), _meta_text(ring.meta), mode=0o600)


def _meta_text(meta: dict[str, dict[str, str]]) -> str:
    return json.dumps({"version": 1, "keys": meta}, indent=2, sort_keys=True) + "\n"


@contextlib.contextmanager
def key_file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for an edit of the key file at ``path`` (``.<name>.lock`` next
    to it, 0600), so two edits never lose one another's change."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def list_keys(path: str | Path) -> list[ApiKey]:
    """Every key of the key file at ``path`` with its name and creation time."""
    return load_key_ring(path).keys


def add_key(path: str | Path, name: str) -> ApiKey:
    """Append a new random key called ``name`` (creating the file when missing); returns it
    (the only time its secret is known to the caller)."""
    with key_file_lock(path):
        ring = load_key_ring(path, missing_ok=True)
        key = ApiKey(name, new_secret(), utc_now())
        save_key_ring(path, ring.added(key.name, key.secret, str(key.created)), previous=ring)
    return key


def revoke_key(path: str | Path, name: str) -> ApiKey:
    """Remove the key called ``name`` (never the last one); returns what was removed."""
    with key_file_lock(path):
        ring = load_key_ring(path)
        gone = ring.find(name)
        save_key_ring(path, ring.revoked(name), previous=ring)
    return gone


def rotate_key(path: str | Path, name: str) -> ApiKey:
    """Give the key called ``name`` a new random secret in its place (the old one stops
    working); returns the new key."""
    with key_file_lock(path):
        ring = load_key_ring(path)
        key = ApiKey(ring.find(name).name, new_secret(), utc_now())
        save_key_ring(path, ring.rotated(name, key.secret, str(key.created)), previous=ring)
    return key
