"""Download: the sharded, verified fetch of the model into <shared>/models, every node its share."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from cluster.stages.base import Stage, StageOutcome, UpContext
from cluster.stages.env import env_python


def is_local_model(model: str) -> bool:
    """A model given as a directory path (used as it is) rather than a hub repo id."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().is_dir()


def model_target(shared_dir: str, repo: str, revision: str | None) -> str:
    """``<shared>/models/<owner>--<name>[@rev]``: one directory per repo and revision."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "--", repo)
    rev = f"@{re.sub(r'[^A-Za-z0-9_.-]+', '-', revision)}" if revision else ""
    return f"{shared_dir.rstrip('/')}/models/{safe}{rev}"


class Download(Stage):
    """Fetch the model once, split by bytes over the nodes, verified by sha256."""

    name = "download"
    title = "model files on the shared dir (split over the nodes, verified)"

    def skip_reason(self, ctx: UpContext) -> str | None:
        model = ctx.state.model or ""
        if is_local_model(model):
            return (
                f"model is a directory ({Path(model).expanduser().absolute()}): nothing to download"
            )
        return None

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        model = ctx.state.model or "<model>"
        target = model_target(str(ctx.state.shared_dir), model, ctx.config.revision)
        python = env_python(ctx.state.env_dir or "<env>")
        return {
            n.label: [
                f"{shlex.quote(python)} -m cluster.download.node --node {n.name}   "
                f"# stdin: its share of {model} -> {target}"
            ]
            for n in ctx.cluster
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        from cluster.download.controller import download_model

        model = str(ctx.state.model)
        target = model_target(str(ctx.state.shared_dir), model, ctx.config.revision)
        result = download_model(
            model,
            target=target,
            runners=ctx.runners,
            python=env_python(str(ctx.state.env_dir)),
            revision=ctx.config.revision,
            token=os.environ.get("HF_TOKEN") or None,
            timeout=6 * 3600,
        )
        for name, summary in result.summaries.items():
            node = next(n for n in ctx.cluster if n.name == name)
            ctx.reporter.node(
                node.label,
                f"{summary.get('fetched', 0)} file(s) fetched ({int(summary.get('bytes', 0)) / 1e6:.1f} MB), "
                f"{summary.get('skipped', 0)} already verified",
            )
        ctx.state.model_dir = target
        fetched = result.fetched_bytes
        total = result.plan.total_bytes
        return StageOutcome(
            "done" if fetched else "unchanged",
            f"{target} ({total / 1e6:.1f} MB, {fetched / 1e6:.1f} MB fetched now)"
            if fetched
            else f"{target} already complete and verified",
        )
