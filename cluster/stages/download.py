"""Download: the sharded, verified fetch of the model into <shared>/models, every node its share."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LoraTarget:
    """Where one ``--lora NAME=SOURCE`` adapter's files are on the nodes."""

    name: str
    repo_id: str | None  # None: SOURCE is a directory on the shared dir, used as it is
    dir: str


def lora_targets(specs: list[str], shared_dir: str | None) -> list[LoraTarget]:
    """Each adapter's directory: a path as it is, a hub repo its download's target
    ``<shared>/models/<org>--<name>``, beside the models."""
    from serve.lora import parse_lora_spec

    targets = []
    for spec in specs:
        name, source = parse_lora_spec(spec)
        if is_local_model(source):
            targets.append(LoraTarget(name, None, str(Path(source).expanduser().absolute())))
        else:
            targets.append(LoraTarget(name, source, model_target(str(shared_dir), source, None)))
    return targets


def _adapters(ctx: ClusterContext) -> list[LoraTarget]:
    """The adapters `up` was asked for, every model's (none outside `up`)."""
    config = getattr(ctx, "config", None)
    if config is None:
        return []
    specs = [*config.lora, *(spec for m in ctx.state.more_models for spec in m.lora)]
    return lora_targets(specs, ctx.state.shared_dir)


def _models(ctx: ClusterContext) -> list[tuple[str | None, str, str | None]]:
    """Every model of the endpoint: (hub repo or None for a directory, its directory, revision)."""
    first = ctx.state.model
    out = [(first.repo_id, str(first.dir), first.revision)] if first.dir else []
    out += [(m.repo_id, str(m.dir), m.revision) for m in ctx.state.more_models if m.dir]
    return out


class Download(Stage):
    """Fetch the model and any hub LoRA adapters once, split by bytes over the nodes,
    verified by sha256."""

    name = "download"
    title = "model files on the shared dir (split over the nodes, verified)"

    sections = ("download",)

    def skip_reason(self, ctx: UpContext) -> str | None:
        if not any(repo for repo, _, _ in _models(ctx)) and not any(
            a.repo_id for a in _adapters(ctx)
        ):
            dirs = ", ".join(d for _, d, _ in _models(ctx))
            return f"model is a directory ({dirs}): nothing to download"
        return None

    def check(self, ctx: ClusterContext) -> StageCheck:
        """Every served model's config.json is readable on every node."""
        models = [d for _, d, _ in _models(ctx)]
        if not models:
            return StageCheck(None, "no model recorded")
        adapters = _adapters(ctx)
        files = [d + "/config.json" for d in models]
        files += [a.dir + "/adapter_config.json" for a in adapters]
        test = " && ".join(f"test -r {shlex.quote(f)}" for f in files)
        results = ctx.run(test, what="model present?", timeout=30, check=False)
        missing = [n.label for n, r in results.items() if not r.ok]
        what = ", ".join(models) + (f" and {len(adapters)} LoRA adapter(s)" if adapters else "")
        if missing:
            return StageCheck(False, f"{what} not readable on {', '.join(missing)}")
        return StageCheck(True, f"{what} on every node")

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        python = env_python(env_dir_for(ctx))
        fetches = [(repo, target) for repo, target, _ in _models(ctx) if repo]
        fetches += [(a.repo_id, a.dir) for a in _adapters(ctx) if a.repo_id]
        return {
            n.label: [
                f"{shlex.quote(python)} -m cluster.download.node --node {n.name}   "
                f"# stdin: its share of {repo} -> {where}"
                for repo, where in fetches
            ]
            for n in ctx.cluster
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        fetched = total = 0
        done: list[str] = []
        for i, (repo, target, revision) in enumerate(_models(ctx)):
            if repo is None:
                continue
            got, size = self._fetch(ctx, repo, target, revision=revision)
            if i == 0:
                ctx.state.download.dir, ctx.state.download.total_bytes = target, size
            fetched, total = fetched + got, total + size
            done.append(target)
        for adapter in _adapters(ctx):
            if adapter.repo_id is not None:
                got, size = self._fetch(ctx, adapter.repo_id, adapter.dir, revision=None)
                fetched, total = fetched + got, total + size
                done.append(adapter.dir)
        where = ", ".join(done)
        return StageOutcome(
            "done" if fetched else "unchanged",
            f"{where} ({total / 1e6:.1f} MB, {fetched / 1e6:.1f} MB fetched now)"
            if fetched
            else f"{where} already complete and verified",
        )

    @staticmethod
    def _fetch(ctx: UpContext, repo: str, target: str, *, revision: str | None) -> tuple[int, int]:
        """One repo into ``target`` by the sharded download; (bytes fetched now, total bytes)."""
        from cluster.download.controller import download_model

        result = download_model(
            repo,
            target=target,
            runners=ctx.runners,
            python=env_python(str(ctx.state.env.dir)),
            revision=revision,
            token=os.environ.get("HF_TOKEN") or None,
            timeout=6 * 3600,
            command=f"up --name {ctx.state.name} (download {repo})",
            wait=ctx.config.wait,  # `up --wait` also queues behind another download into the dir
            on_wait=ctx.reporter.print,
        )
        for name, summary in result.summaries.items():
            node = next(n for n in ctx.cluster if n.name == name)
            ctx.reporter.node(
                node.label,
                f"{repo}: {summary.get('fetched', 0)} file(s) fetched "
                f"({int(summary.get('bytes', 0)) / 1e6:.1f} MB), "
                f"{summary.get('skipped', 0)} already verified",
            )
        return result.fetched_bytes, result.plan.total_bytes
