"""Shared storage (provider NFS proven by a token, or NFS from the head) and cachefilesd + fsc."""

from __future__ import annotations

import json
import secrets
import shlex

from cluster import fscache
from cluster.errors import ConfigError, RemoteError
from cluster.inventory import Node
from cluster.runner import Result
from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, Teardown, UpContext

# The token file that proves the nodes share one filesystem: written on the head, read everywhere.
TOKEN_NAME = ".llamacluster-shared-check"
WRITE_TOKEN_TEMPLATE = "mkdir -p {shared} && printf '%s\\n' {token} > {shared}/{name}"
READ_TOKEN_TEMPLATE = "cat {shared}/{name} 2>/dev/null || echo missing"
IS_MOUNTPOINT_TEMPLATE = "mountpoint -q {shared} && echo mounted || echo not-mounted"


def _sudo(ctx: UpContext, node: Node) -> str:
    if ctx.config.test_root:
        return ""
    rec = ctx.state.node(node.name)
    return rec.sudo if rec is not None and rec.sudo else ""


def _python(ctx: UpContext, node: Node) -> str:
    rec = ctx.state.node(node.name)
    return rec.python if rec is not None and rec.python else "python3"


def fscache_command(ctx: UpContext, node: Node, command: str, *args: str) -> str:
    """``python3 - <command> --root R ...`` for a node; the module source goes on stdin."""
    return fscache.script_command(
        command,
        "--root",
        str(ctx.config.system_root),
        *args,
        python=_python(ctx, node),
        sudo=_sudo(ctx, node),
    )


def run_fscache(ctx: UpContext, node: Node, command: str, *args: str) -> dict:
    """Run one fscache edit on a node; a refusal becomes a ConfigError naming the node."""
    res: Result = ctx.run(
        fscache_command(ctx, node, command, *args),
        what=f"fscache {command}",
        nodes=[node],
        stdin=fscache.script_source(),
        check=False,
    )[node]
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}
    except ValueError:
        out = {}
    if res.returncode == fscache.EXIT_REFUSED:
        raise ConfigError(
            f"{node.label}: {out.get('refused', 'edit refused')}", hint="nothing was written"
        )
    res.check(what=f"fscache {command} on {node.label}")
    return out


def revert_system_files(
    ctx: ClusterContext, edits: dict[str, list[str]], how: Teardown
) -> list[str]:
    """Undo this module's fstab/exports/cachefilesd edits on every node named in ``edits``
    (fscache ``revert``: only the marked lines go). A node that confirms is dropped from
    ``edits``; one that does not is added to ``how.failed`` and stays recorded."""
    root = ctx.state.access.system_root
    done = []
    for runner in ctx.runners:
        rec = ctx.state.node(runner.node.name)
        if rec is None or not edits.get(rec.name):
            continue
        res = runner.run(
            fscache.script_command(
                "revert",
                "--root",
                root,
                python=rec.python or "python3",
                sudo=(rec.sudo or "") if root == "/" else "",
            ),
            stdin=fscache.script_source(),
            timeout=60,
        )
        if not res.ok:
            ctx.reporter.warn(f"{runner.label}: could not revert system files: {res.tail(1)}")
            if runner.label not in how.failed:
                how.failed.append(runner.label)
            continue
        edits.pop(rec.name, None)
        ctx.reporter.node(runner.label, "llamacluster's fstab/exports/cachefilesd edits undone")
        done.append(runner.label)
    return done


def root_logins(ctx: UpContext) -> bool:
    """True when a worker logs in as root (then the export must keep root: no_root_squash)."""
    for w in ctx.cluster.workers:
        rec = ctx.state.node(w.name)
        if (rec is not None and rec.sudo == "") or (w.user or ctx.config.ssh_user) == "root":
            return True
    return False


def run_system(ctx: UpContext, node: Node, commands: list[str], *, what: str) -> None:
    """Run system commands (packages, services, mounts) unless in test-root mode."""
    for command in commands:
        ctx.run(command, what=what, nodes=[node], timeout=600)


class SharedStorage(Stage):
    """Prove the shared dir is one filesystem on every node (or export it from the head)."""

    name = "storage"
    title = "shared directory seen by every node"
    sections = ("storage",)

    def check(self, ctx: ClusterContext) -> StageCheck:
        """Every node reads the head's token file in the shared directory."""
        if len(ctx.cluster) == 1 or not ctx.state.shared_dir:
            return StageCheck(None, "one node: nothing shared")
        read = READ_TOKEN_TEMPLATE.format(shared=shlex.quote(ctx.state.shared_dir), name=TOKEN_NAME)
        seen = {n: r.stdout.strip() for n, r in ctx.run(read, what="shared?", check=False).items()}
        head = seen.get(ctx.head, "missing")
        apart = [n.label for n, v in seen.items() if v != head or v == "missing"]
        if apart:
            return StageCheck(False, f"{', '.join(apart)} do not see {ctx.state.shared_dir}")
        return StageCheck(True, f"{ctx.state.shared_dir} shared by {len(seen)} nodes")

    def skip_reason(self, ctx: UpContext) -> str | None:
        if len(ctx.cluster) == 1:
            return "one node: nothing to share"
        return None

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """With --purge: take the export and the workers' mount lines out of exports/fstab."""
        if not how.purge:
            return None
        done = revert_system_files(ctx, ctx.state.storage.fs_edits, how)
        return f"NFS lines removed on {', '.join(done)}" if done else None

    def _shared(self, ctx: UpContext) -> str:
        return shlex.quote(str(ctx.state.shared_dir))

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        shared = self._shared(ctx)
        plan: dict[str, list[str]] = {n.label: [] for n in ctx.cluster}
        if ctx.config.nfs_server == "head":
            workers = [w.private_ip or w.host for w in ctx.cluster.workers]
            head_ip = ctx.head.private_ip or ctx.head.host
            plan[ctx.head.label] += [
                f"mkdir -p {shared}",
                fscache_command(
                    ctx,
                    ctx.head,
                    "add-export",
                    "--shared-dir",
                    str(ctx.state.shared_dir),
                    *[a for w in workers for a in ("--client", w)],
                    *(["--no-root-squash"] if root_logins(ctx) else []),
                ),
                *([] if ctx.config.test_root else fscache.export_commands(_sudo(ctx, ctx.head))),
            ]
            for w in ctx.cluster.workers:
                plan[w.label] += [
                    fscache_command(
                        ctx,
                        w,
                        "add-mount",
                        "--server",
                        head_ip,
                        "--shared-dir",
                        str(ctx.state.shared_dir),
                    ),
                    *(
                        []
                        if ctx.config.test_root
                        else fscache.worker_mount_commands(str(ctx.state.shared_dir), _sudo(ctx, w))
                    ),
                ]
        token = "<random token>"
        plan[ctx.head.label].append(
            WRITE_TOKEN_TEMPLATE.format(shared=shared, token=token, name=TOKEN_NAME)
        )
        for n in ctx.cluster:
            plan[n.label].append(READ_TOKEN_TEMPLATE.format(shared=shared, name=TOKEN_NAME))
        return plan

    def run(self, ctx: UpContext) -> StageOutcome:
        changed = False
        if ctx.config.nfs_server == "head":
            changed = self._nfs_from_head(ctx)
        token = secrets.token_hex(16)
        shared = self._shared(ctx)
        ctx.run_head(
            WRITE_TOKEN_TEMPLATE.format(shared=shared, token=token, name=TOKEN_NAME),
            what="writing the shared-dir token on the head",
        )
        reads = ctx.run(
            READ_TOKEN_TEMPLATE.format(shared=shared, name=TOKEN_NAME), what="reading the token"
        )
        missing = [n.label for n, r in reads.items() if r.stdout.strip() != token]
        if missing:
            raise RemoteError(
                f"{', '.join(missing)} do not see the head's {ctx.state.shared_dir}: it is not one "
                "shared filesystem",
                hint="mount the same NFS export at that path on every node, pass the right "
                "--shared-dir, or use --nfs-server head",
            )
        for n in ctx.cluster:
            ctx.reporter.node(n.label, "reads the head's token: same filesystem")
        how = "exported from the head" if ctx.config.nfs_server == "head" else "already shared"
        ctx.state.storage.how = how
        return StageOutcome(
            "done" if changed else "unchanged", f"{ctx.state.shared_dir} {how} on every node"
        )

    def _nfs_from_head(self, ctx: UpContext) -> bool:
        shared = str(ctx.state.shared_dir)
        head_ip = ctx.node_state(ctx.head).private_ip or ctx.head.host
        clients = [
            c
            for w in ctx.cluster.workers
            for c in ("--client", ctx.node_state(w).private_ip or w.host)
        ]
        ctx.run_head(f"mkdir -p {shlex.quote(shared)}", what="creating the shared dir")
        squash = ["--no-root-squash"] if root_logins(ctx) else []
        out = run_fscache(ctx, ctx.head, "add-export", "--shared-dir", shared, *clients, *squash)
        edits = ctx.state.storage.fs_edits
        edits[ctx.head.name] = sorted({*edits.get(ctx.head.name, []), "/etc/exports"})
        ctx.state.save()  # recorded at once: `down --purge` undoes it even if a later step fails
        changed = bool(out.get("changed"))
        if not ctx.config.test_root:
            run_system(
                ctx, ctx.head, fscache.export_commands(_sudo(ctx, ctx.head)), what="NFS export"
            )
        for w in ctx.cluster.workers:
            got = run_fscache(ctx, w, "add-mount", "--server", head_ip, "--shared-dir", shared)
            edits[w.name] = sorted({*edits.get(w.name, []), "/etc/fstab"})
            ctx.state.save()
            changed = changed or bool(got.get("changed"))
            if not ctx.config.test_root:
                run_system(
                    ctx, w, fscache.worker_mount_commands(shared, _sudo(ctx, w)), what="NFS mount"
                )
        return changed


class Cache(Stage):
    """cachefilesd and ``fsc`` on the NFS mount, so every node reads weights once over the network."""

    name = "cache"
    title = "cachefilesd + fsc on the NFS mount"
    sections = ("cache",)

    def check(self, ctx: ClusterContext) -> StageCheck:
        """cachefilesd runs on every node whose files the stage edited."""
        edited = [n for n in ctx.cluster if ctx.state.cache.fs_edits.get(n.name)]
        if not edited:
            return StageCheck(None, "no cache set up")
        if ctx.state.access.system_root != "/":
            return StageCheck(
                True, f"files edited under {ctx.state.access.system_root} (test root)"
            )
        results = ctx.run(
            "pidof cachefilesd >/dev/null", what="cachefilesd?", nodes=edited, check=False
        )
        stopped = [n.label for n, r in results.items() if not r.ok]
        if stopped:
            return StageCheck(False, f"cachefilesd not running on {', '.join(stopped)}")
        return StageCheck(True, f"cachefilesd running on {len(results)} node(s)")

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """With --purge: take fsc out of fstab, put cachefilesd's files back."""
        if not how.purge:
            return None
        done = revert_system_files(ctx, ctx.state.cache.fs_edits, how)
        return f"system files restored on {', '.join(done)}" if done else None

    def skip_reason(self, ctx: UpContext) -> str | None:
        if ctx.config.local:
            return "--local: the model is on a local disk, no NFS to cache"
        return None

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        shared = str(ctx.state.shared_dir)
        plan: dict[str, list[str]] = {}
        for n in ctx.cluster:
            sudo = _sudo(ctx, n)
            cmds = (
                [] if ctx.config.test_root else list(fscache.install_cachefilesd_commands(sudo)[:1])
            )
            cmds += [
                fscache_command(ctx, n, "cachefilesd", "--cache-dir", ctx.config.cache_dir),
                fscache_command(ctx, n, "add-fsc", "--shared-dir", shared),
            ]
            if not ctx.config.test_root:
                cmds.append(fscache.install_cachefilesd_commands(sudo)[1])
                cmds.append(
                    f"{fscache.check_fsc_command('<mountpoint>')} || {{ {' && '.join(fscache.remount_commands('<mountpoint>', sudo))}; }}"
                )
                cmds.append(fscache.check_fsc_command("<mountpoint>"))
            plan[n.label] = cmds
        return plan

    def run(self, ctx: UpContext) -> StageOutcome:
        shared = str(ctx.state.shared_dir)
        changed_any = False
        edited: dict[str, list[str]] = {}
        for n in ctx.cluster:
            sudo = _sudo(ctx, n)
            if not ctx.config.test_root:
                run_system(
                    ctx,
                    n,
                    fscache.install_cachefilesd_commands(sudo)[:1],
                    what="installing cachefilesd",
                )
            conf = run_fscache(ctx, n, "cachefilesd", "--cache-dir", ctx.config.cache_dir)
            fsc = run_fscache(ctx, n, "add-fsc", "--shared-dir", shared)
            changed = bool(conf.get("changed") or fsc.get("changed"))
            edited[n.name] = [
                *conf.get("files", []),
                *(["/etc/fstab"] if fsc.get("changed") else []),
            ]
            if fsc.get("warning"):
                ctx.reporter.warn(f"{n.label}: {fsc['warning']}")
            if ctx.config.test_root:
                ctx.reporter.node(
                    n.label,
                    f"files edited under {ctx.config.system_root} ({'changed' if changed else 'unchanged'}); "
                    "no package, service or mount command run (test root)",
                )
            else:
                run_system(
                    ctx,
                    n,
                    fscache.install_cachefilesd_commands(sudo)[1:],
                    what="starting cachefilesd",
                )
                mountpoint = fsc.get("mountpoint")
                if mountpoint:
                    changed = self._remount_if_needed(ctx, n, mountpoint, sudo) or changed
                ctx.reporter.node(
                    n.label,
                    "cachefilesd running" + (f", {mountpoint} has FSC yes" if mountpoint else ""),
                )
            changed_any = changed_any or changed
        for name, files in edited.items():
            if files:
                prev = ctx.state.cache.fs_edits.get(name, [])
                ctx.state.cache.fs_edits[name] = sorted(set(prev) | set(files))
        return StageOutcome(
            "done" if changed_any else "unchanged", "cache configured on every node"
        )

    @staticmethod
    def _remount_if_needed(ctx: UpContext, node: Node, mountpoint: str, sudo: str) -> bool:
        check = fscache.check_fsc_command(mountpoint)
        if ctx.run(check, what="FSC check", nodes=[node], check=False)[node].ok:
            return False
        # The kernel keeps the old options on a remount: unmount fully, then mount from fstab.
        run_system(
            ctx,
            node,
            fscache.remount_commands(mountpoint, sudo),
            what=f"remounting {mountpoint} (stop anything using it first)",
        )
        ctx.run(check, what=f"FSC yes in /proc/fs/nfsfs/volumes for {mountpoint}", nodes=[node])
        return True
