"""Where config.json comes from: a local model directory (or the file itself), else a hub
repo id fetched through huggingface_hub (config.json alone, no weights)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError, DownloadError
from cluster.planner.shape import ModelShape, parse_model_shape

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def load_model_config(source: str, *, revision: str | None = None) -> dict[str, Any]:
    """config.json of a local directory (or the file itself), else of a hub repo id.

    The hub is asked for ``config.json`` alone (no weights) through huggingface_hub, with
    HF_ENDPOINT and HF_TOKEN read at call time. A missing repo or file is a ConfigError; an
    unreachable hub is a DownloadError.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{source} has no config.json",
                hint="point --model at a Hugging Face model directory",
            )
    elif not path.is_file():
        if source.startswith((".", "/", "~")) or not _REPO_ID_RE.match(source):
            raise ConfigError(
                f"{source}: no such directory, and not a hub repo id",
                hint="pass a local model directory or a repo id like meta-llama/Llama-3.1-8B",
            )
        path = Path(_download_config(source, revision=revision))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}", hint="check that it is valid JSON"
        ) from None


def _download_config(repo_id: str, *, revision: str | None) -> str:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    where = endpoint or "the Hugging Face hub"
    try:
        return hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            endpoint=endpoint,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except hf_errors.GatedRepoError:
        raise ConfigError(
            f"{repo_id} is gated on {where}",
            hint="accept its license on the hub and export HF_TOKEN",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ConfigError(
            f"no repo {repo_id!r} on {where}",
            hint="check the repo id (and HF_TOKEN for private repos), or pass a local directory",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ConfigError(f"{repo_id} has no revision {revision!r}") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise ConfigError(f"{repo_id} has no config.json on {where}") from None
    except hf_errors.LocalEntryNotFoundError as exc:
        # huggingface_hub wraps the failed lookup; a 4xx answer means the hub was reached.
        response = getattr(exc.__cause__, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(exc.__cause__, hf_errors.EntryNotFoundError) or status == 404:
            raise ConfigError(
                f"no {repo_id}/config.json on {where} (HTTP {status or 404})",
                hint="check the repo id (and HF_TOKEN for private repos), or pass a local directory",
            ) from None
        if status in (401, 403):
            raise ConfigError(
                f"{where} refused {repo_id}/config.json (HTTP {status})",
                hint="export HF_TOKEN with access to the repo",
            ) from None
        raise DownloadError(
            f"cannot reach {where} for {repo_id}/config.json, and it is not in the local cache",
            hint="check the network and HF_ENDPOINT, or pass a local model directory",
        ) from None
    except OSError as exc:
        raise DownloadError(
            f"cannot fetch config.json of {repo_id} from {where}: {type(exc).__name__}: {exc}",
            hint="check the network, HF_ENDPOINT and HF_TOKEN, or pass a local model directory",
        ) from None


def load_model_shape(source: str, *, revision: str | None = None) -> ModelShape:
    """ModelShape of a local model directory or hub repo id (config.json only)."""
    return parse_model_shape(load_model_config(source, revision=revision), name=source)
