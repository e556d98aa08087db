"""Find a model's tokenizer on local disk (a model dir or the hub cache) and count tokens with it."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.errors import ConfigError


class LocalTokenizer:
    """A `tokenizers` tokenizer loaded from tokenizer.json: exact token counts, no transformers."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        special = {int(i) for i in self._tok.get_added_tokens_decoder()}
        self.special_ids = special
        # Ids a random prompt may use: everything but special/added tokens.
        self.plain_ids = [i for i in range(self._tok.get_vocab_size()) if i not in special]

    def count(self, text: str) -> int:
        """Tokens in ``text`` without special tokens (what the model sees of it)."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        return self._tok.decode(ids, skip_special_tokens=True)


def _tokenizer_file(candidate: Path) -> Path | None:
    if candidate.is_file() and candidate.name.endswith(".json"):
        return candidate
    if candidate.is_dir() and (candidate / "tokenizer.json").is_file():
        return candidate / "tokenizer.json"
    return None


def _from_hub_cache(repo_id: str) -> Path | None:
    """tokenizer.json of a repo already in the local hub cache (never downloads)."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "tokenizer.json")
    except Exception:
        return None
    return Path(found) if isinstance(found, str) else None


def find_tokenizer(model: str | None, *, explicit: str | None = None) -> LocalTokenizer | None:
    """The tokenizer for ``model`` if one is on this machine, else None.

    ``explicit`` (a dir, a tokenizer.json or a cached repo id) must be found, or ConfigError; the
    model name is only tried (a local path, then the hub cache).
    """
    for name, required in ((explicit, True), (model, False)):
        if not name:
            continue
        path = _tokenizer_file(Path(name).expanduser()) or _from_hub_cache(name)
        if path is not None:
            try:
                return LocalTokenizer(path)
            except (OSError, ValueError, json.JSONDecodeError, Exception) as exc:
                if required:
                    raise ConfigError(f"cannot load tokenizer {path}: {exc}") from None
                return None
        if required:
            raise ConfigError(
                f"no tokenizer.json found for {name!r}",
                hint="pass a model dir, a tokenizer.json, or a hub repo id that is in the local cache",
            )
    return None
