"""Download: the sharded, verified fetch of the model into <shared>/models, every node its share."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, UpContext
from cluster.stages.env import env_dir_for, env_python


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

    sections = ("download",)

    def skip_reason(self, ctx: UpContext) -> str | None:
        if ctx.state.model.repo_id is None:
            return f"model is a directory ({ctx.state.model.dir}): nothing to download"
        return None

    def check(self, ctx: ClusterContext) -> StageCheck:
        """The served model's config.json is readable on every node."""
        model_dir = ctx.state.model.dir
        if not model_dir:
            return StageCheck(None, "no model recorded")
        test = f"test -r {shlex.quote(model_dir + '/config.json')}"
        results = ctx.run(test, what="model present?", timeout=30, check=False)
        missing = [n.label for n, r in results.items() if not r.ok]
        if missing:
            return StageCheck(False, f"{model_dir} not readable on {', '.join(missing)}")
        return StageCheck(True, f"{model_dir} on every node")

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        model = ctx.state.model.repo_id or "<model>"
        target = str(ctx.state.model.dir)
        python = env_python(env_dir_for(ctx))
        return {
            n.label: [
                f"{shlex.quote(python)} -m cluster.download.node --node {n.name}   "
                f"# stdin: its share of {model} -> {target}"
            ]
            for n in ctx.cluster
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        from cluster.download.controller import download_model

        model = str(ctx.state.model.repo_id)
        target = str(ctx.state.model.dir)
        result = download_model(
            model,
            target=target,
            runners=ctx.runners,
            python=env_python(str(ctx.state.env.dir)),
            revision=ctx.state.model.revision,
            token=os.environ.get("HF_TOKEN") or None,
            timeout=6 * 3600,
            command=f"up --name {ctx.state.name} (download {model})",
            wait=ctx.config.wait,  # `up --wait` also queues behind another download into the dir
            on_wait=ctx.reporter.print,
        )
        for name, summary in result.summaries.items():
            node = next(n for n in ctx.cluster if n.name == name)
            ctx.reporter.node(
                node.label,
                f"{summary.get('fetched', 0)} file(s) fetched ({int(summary.get('bytes', 0)) / 1e6:.1f} MB), "
                f"{summary.get('skipped', 0)} already verified",
            )
        fetched = result.fetched_bytes
        total = result.plan.total_bytes
        ctx.state.download.dir, ctx.state.download.total_bytes = target, total
        return StageOutcome(
            "done" if fetched else "unchanged",
            f"{target} ({total / 1e6:.1f} MB, {fetched / 1e6:.1f} MB fetched now)"
            if fetched
            else f"{target} already complete and verified",
        )
