"""Per-cluster state on the controller: what `up` set up, so `down`, `status` and a rerun find it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from cluster.errors import ConfigError
from cluster.files import atomic_write
from cluster.measure import CpuMeasurement, GpuMeasurement, LinkMeasurement

#: Name of the state file inside a cluster's directory.
STATE_FILE = "state.json"
#: Name of the Ray auth token file inside a cluster's directory (and on every node).
TOKEN_FILE = "ray_token"
#: Name of the generated API key file inside a cluster's directory.
API_KEY_FILE = "api_key"
#: Cluster names: safe as a directory name and inside shell commands without quoting.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

StageStatus = Literal["done", "unchanged", "skipped", "failed"]


def llamacluster_home() -> Path:
    """The controller's state root: ``$LLAMACLUSTER_HOME`` or ``~/.llamacluster``."""
    env = os.environ.get("LLAMACLUSTER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".llamacluster"


def cluster_dir(name: str) -> Path:
    """``<home>/clusters/<name>``: the 0700 directory holding one cluster's state and secrets."""
    return llamacluster_home() / "clusters" / check_cluster_name(name)


def check_cluster_name(name: str) -> str:
    """Return ``name`` when it can name a cluster (a directory, a shell word), else ConfigError."""
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"bad cluster name {name!r}",
            hint="use letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit",
        )
    return name


def default_cluster_name(inventory: str | Path | None) -> str:
    """``local`` for ``--local``; else a readable word from the inventory path plus a short hash.

    ``deploy/ips.txt`` inside a project ``myproj`` becomes ``myproj-1a2b3c``: the parent directory
    (or the project above ``deploy/``) says which cluster it is, the hash of the absolute path keeps
    two inventories with the same directory name apart.
    """
    if inventory is None:
        return "local"
    path = Path(inventory).expanduser().absolute()
    word = path.stem if path.stem not in ("ips", "hosts", "inventory") else path.parent.name
    if word in ("deploy", "") and path.parent.parent.name:
        word = path.parent.parent.name
    word = re.sub(r"[^A-Za-z0-9_.-]+", "-", word).strip(".-_")[:40] or "cluster"
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:6]
    return f"{word}-{digest}"


class Ports(BaseModel):
    """The ports this cluster uses; chosen once by the first `up`, reused by every later one."""

    ray_gcs: int = Field(description="Ray head's GCS port (workers join on <head-ip>:<port>).")
    dashboard: int = Field(description="Ray dashboard port, bound to 127.0.0.1 on the head.")
    api: int = Field(description="OpenAI-compatible API port on the head (direct ingress).")
    serve_proxy: int | None = Field(default=None, description="Ray Serve's own HTTP proxy port.")
    ray_client: int | None = Field(default=None, description="Ray client server port.")
    monitor: int | None = Field(
        default=None,
        description="The monitor's Prometheus, bound to 127.0.0.1 on the head (None: the "
        "monitor stage was skipped when the ports were chosen).",
    )


class NodeState(BaseModel):
    """What preflight learned about one node (the `nodes` section: preflight writes it)."""

    name: str = Field(description="Role name: head, worker1, ...")
    label: str = Field(description="How output lines name the node (host or host:port).")
    host: str = Field(description="SSH host from the inventory.")
    user: str | None = Field(default=None, description="SSH user, when the inventory names one.")
    port: int | None = Field(default=None, description="SSH port, when the inventory names one.")
    private_ip: str | None = Field(default=None, description="Address used among the nodes.")
    interface: str | None = Field(default=None, description="Network interface holding it.")
    python: str | None = Field(default=None, description="System python3 path on the node.")
    home: str | None = Field(default=None, description="The SSH user's home on the node.")
    os: str | None = Field(default=None, description="PRETTY_NAME from /etc/os-release.")
    sudo: str | None = Field(
        default=None,
        description="'' when root, 'sudo -n' when passwordless sudo, None when neither.",
    )
    devices: int = Field(default=0, description="Accelerators (or CPU worker slots) Ray offers.")
    device_kind: Literal["gpu", "cpu"] = Field(default="cpu", description="What the devices are.")
    device_info: dict[str, str] = Field(
        default_factory=dict,
        description="Driver/CUDA version, memory per device, NUMA nodes, CPU flags.",
    )
    machine_id: str | None = Field(default=None, description="/etc/machine-id (shared host?).")
    boot_id: str | None = Field(
        default=None, description="The node's boot id: a change means it rebooted."
    )
    net_namespace: str | None = Field(
        default=None,
        description="The node's network namespace (net:[inode]): nodes on one host "
        "with one namespace read the same interface counters.",
    )
    versions: dict[str, str] = Field(
        default_factory=dict, description="Versions preflight saw (system python3)."
    )


class StageResult(BaseModel):
    """The outcome of one stage in the last `up`."""

    status: StageStatus = Field(description="done, unchanged (already done), skipped or failed.")
    message: str = Field(default="", description="One line for a person.")
    seconds: float = Field(default=0.0, description="Wall time of the stage.")
    at: float = Field(default_factory=time.time, description="When it finished (epoch seconds).")


class Access(BaseModel):
    """How the controller reaches the nodes, as `up`'s flags gave it (written by `up` itself)."""

    local: bool = Field(default=False, description="Driven without SSH (`up --local`).")
    inventory_path: str | None = Field(default=None, description="Inventory file, if any.")
    inventory_text: str = Field(default="", description="The inventory as parsed by `up`.")
    ssh_user: str | None = Field(default=None, description="--ssh-user given to `up`.")
    ssh_port: int | None = Field(default=None, description="--ssh-port given to `up`.")
    identity_file: str | None = Field(default=None, description="--ssh-key given to `up`.")
    known_hosts: str | None = Field(default=None, description="Known-hosts file used, if custom.")
    strict_host_keys: bool = Field(
        default=False,
        description="--strict-host-keys given to `up`: every later command refuses unknown keys too.",
    )
    system_root: str = Field(default="/", description="Root the cache/storage stages edit under.")


class Secrets(BaseModel):
    """Secret files on the controller (0600; the values are never stored here)."""

    ray_token: str | None = Field(default=None, description="Ray token file.")
    api_key_file: str | None = Field(default=None, description="API key file.")


class ModelSection(BaseModel):
    """The model asked for, resolved by `up` before any stage runs."""

    source: str | None = Field(default=None, description="As asked: a hub repo id or a path.")
    repo_id: str | None = Field(default=None, description="The hub repo id (None: a directory).")
    revision: str | None = Field(default=None, description="Hub revision asked for, if any.")
    dir: str | None = Field(default=None, description="Where the served files are (shared dir).")
    served_names: list[str] = Field(
        default_factory=list, description="Names clients send; the first is the main one."
    )
    # A further model of the endpoint (`up --model A --model B,...`) has its own layout.
    tp: int | None = Field(default=None, description="A further model's tensor parallel size.")
    pp: int | None = Field(default=None, description="A further model's pipeline parallel size.")
    replicas: int | None = Field(default=None, description="A further model's replicas.")
    max_model_len: int | None = Field(default=None, description="A further model's context.")
    lora: list[str] = Field(
        default_factory=list, description="A further model's LoRA adapters (NAME=SOURCE)."
    )


class StorageSection(BaseModel):
    """Written by the storage stage: how the shared directory is shared."""

    how: str | None = Field(
        default=None, description="'provider NFS' (verified) or 'exported by the head'."
    )
    fs_edits: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per node: system files the stage edited (/etc/exports, /etc/fstab); "
        "`down --purge` undoes them and forgets a node only once it confirms.",
    )


class CacheSection(BaseModel):
    """Written by the cache stage: system files it edited per node (reverted by --purge)."""

    fs_edits: dict[str, list[str]] = Field(default_factory=dict)


class EnvSection(BaseModel):
    """Written by the env stage: the Python env every node runs from, and what it imports."""

    dir: str | None = Field(default=None, description="The env directory (same on every node).")
    versions: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Per node: versions the env imports (vllm, ray, ...)."
    )
    fingerprints: dict[str, str] = Field(
        default_factory=dict,
        description="Per node: a digest of the env's installed packages when it was last "
        "imported in full; while every node's is the same, a re-`up` reads versions without "
        "importing vLLM (empty: import again).",
    )


class MeasureSection(BaseModel):
    """Written by the measure stage: what each node's CPU (and GPUs) and the links to the head
    achieved."""

    cpu: dict[str, CpuMeasurement] = Field(
        default_factory=dict, description="Per node name: the CPU micro-benchmark."
    )
    links: dict[str, LinkMeasurement] = Field(
        default_factory=dict, description="Per worker name: TCP from the head to it."
    )
    gpu: dict[str, GpuMeasurement] = Field(
        default_factory=dict, description="Per GPU node name: the GPU micro-benchmark."
    )


class DownloadSection(BaseModel):
    """Written by the download stage: what was fetched and verified."""

    dir: str | None = Field(default=None, description="The verified model directory.")
    total_bytes: int = Field(default=0, description="Bytes of the model's files.")


class RayNode(BaseModel):
    """One node's Ray as the ray stage started it: how to find (and stop) exactly it."""

    temp_dir: str | None = Field(default=None, description="This cluster's Ray temp dir.")
    session: int | None = Field(default=None, description="Session id of this node's Ray.")
    ports: dict[str, int | None] = Field(
        default_factory=dict, description="Ports this node's Ray listens on (RayNodePorts)."
    )
    token_path: str | None = Field(
        default=None, description="Ray token file on the node (0600), under the node's own home."
    )
    boot_id: str | None = Field(default=None, description="The node's boot id at start.")
    host: str | None = Field(default=None, description="The host it was started on.")
    machine_id: str | None = Field(default=None, description="That host's machine id.")
    supervisor: Literal["systemd", "process"] | None = Field(
        default=None,
        description="What restarts this node's Ray: a systemd unit, the supervisor process "
        "(cluster/supervisor.py; then ``session`` is its pid), or nothing.",
    )
    unit: str | None = Field(
        default=None,
        description="The systemd unit written for this node (also in test-root mode, where only "
        "the file is written); `down --purge` removes it.",
    )

    def same_machine(self, node: NodeState) -> bool:
        """Whether ``node`` (as preflight sees it now) is still the machine and boot this
        record was made on; a record of another host, machine or boot is not to be trusted."""
        pairs = ((self.host, node.host), (self.machine_id, node.machine_id))
        pairs += ((self.boot_id, node.boot_id),)
        return all(a is None or b is None or a == b for a, b in pairs)


class RaySection(BaseModel):
    """Written by the ray stage."""

    head_token_path: str | None = Field(
        default=None, description="Ray token on the head (drivers run there)."
    )
    nodes: dict[str, RayNode] = Field(default_factory=dict, description="By node name.")

    def node(self, name: str) -> RayNode:
        """The record of node ``name`` (an empty one when Ray never started there)."""
        return self.nodes.get(name) or RayNode()


class ServerSection(BaseModel):
    """Written by the serve stage: what is deployed and where it answers."""

    config_digest: str | None = Field(default=None, description="Hash of the served config.")
    endpoint: str | None = Field(default=None, description="OpenAI base URL (on the head).")
    tp: int | None = Field(default=None, description="Tensor parallel size served.")
    pp: int | None = Field(default=None, description="Pipeline parallel size served.")
    replicas: int = Field(
        default=1, description="Engines (tp × pp each) behind the endpoint (HAProxy above 1)."
    )
    served_name: str | None = Field(default=None, description="The main name clients send.")
    aliases: list[str] = Field(default_factory=list, description="Further names it answers to.")
    remote_api_key_file: str | None = Field(default=None, description="API key file on the head.")
    front_digest: str | None = Field(
        default=None,
        description="Hash of what Serve's controller and HAProxy were started with (ports, TLS, "
        "balancing): a new config with the same front is rolled out over the running app.",
    )
    deployed: dict[str, Any] | None = Field(
        default=None,
        description="The serving config deployed (no secrets: key file paths only); a rolling "
        "update that fails deploys it again.",
    )
    deployed_more: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The further models' configs deployed beside it (their own fields only).",
    )
    deployed_versions: dict[str, str] = Field(
        default_factory=dict,
        description="Per Serve app, the version its replicas were deployed as: a rollback "
        "deploys the old config as that version, so the replicas still running it are kept.",
    )
    model_routes: list[str] = Field(
        default_factory=list,
        description="Route prefix of each further model's app (its /ready is under it).",
    )
    models: list[str] = Field(
        default_factory=list, description="The main name of every model the endpoint serves."
    )

    @property
    def endpoint_replicas(self) -> int:
        """Replicas behind the endpoint, every model's together."""
        return self.replicas + further_replicas(self.deployed_more)


def further_replicas(more: list[dict[str, Any]]) -> int:
    """Replicas of the further models' deploy values."""
    return sum(int(m.get("num_replicas") or 1) for m in more)


class MonitoringSection(BaseModel):
    """Written by the monitor stage: the Prometheus it runs on the head, and how to find (and
    stop) exactly it."""

    dir: str | None = Field(
        default=None, description="Its directory on the head: config, token file, data, log."
    )
    url: str | None = Field(default=None, description="http://127.0.0.1:<port> on the head.")
    pid: int | None = Field(
        default=None, description="Its process id, which is also its session id (setsid)."
    )
    boot_id: str | None = Field(default=None, description="The head's boot id at start.")
    config_digest: str | None = Field(
        default=None, description="Hash of its config text and command line."
    )
    binary: str | None = Field(default=None, description="The prometheus binary run.")
    version: str | None = Field(default=None, description="What `prometheus --version` said.")
    installed: bool = Field(
        default=False, description="The stage installed the distribution's package itself."
    )


#: The sections stages own, and which stage writes each (run_stages enforces it).
SECTION_OWNERS: dict[str, str] = {
    "nodes": "preflight",
    "ports": "preflight",
    "storage": "storage",
    "cache": "cache",
    "env": "env",
    "measure": "measure",
    "download": "download",
    "ray": "ray",
    "server": "serve",
    "monitoring": "monitor",
}
STATE_FORMAT = 2
# Keys only the first (flat) format had: their presence marks a file to migrate.
_V1_KEYS = {
    "local", "inventory_text", "inventory_path", "env_dir", "model_dir", "served_model_name",
    "endpoint", "token_path", "api_key_file", "serve_config_hash", "fs_edits", "tp", "pp",
}  # fmt: skip


class ClusterState(BaseModel):
    """Everything the controller records about one cluster; the JSON file is the source of truth
    for `down`, `status`, `logs`, `tunnel` and the next `up`.

    Sections: ``access``, ``shared_dir``, ``model`` and ``secrets`` are what `up` was asked (it
    writes them before any stage runs); every other section is written by one stage only
    (SECTION_OWNERS). Files of the first format (flat fields) are migrated when read.
    """

    format: int = Field(default=STATE_FORMAT, description="Layout version of this file.")
    name: str = Field(description="Cluster name (directory under <home>/clusters).")
    access: Access = Field(default_factory=Access)
    shared_dir: str | None = Field(default=None, description="The directory every node shares.")
    model: ModelSection = Field(default_factory=ModelSection)
    more_models: list[ModelSection] = Field(
        default_factory=list,
        description="The endpoint's further models, each a Serve app of its own (in order).",
    )
    secrets: Secrets = Field(default_factory=Secrets)
    nodes: list[NodeState] = Field(default_factory=list, description="Head first.")
    ports: Ports | None = Field(default=None, description="Ports, once chosen.")
    storage: StorageSection = Field(default_factory=StorageSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    env: EnvSection = Field(default_factory=EnvSection)
    measure: MeasureSection = Field(default_factory=MeasureSection)
    download: DownloadSection = Field(default_factory=DownloadSection)
    ray: RaySection = Field(default_factory=RaySection)
    server: ServerSection = Field(default_factory=ServerSection)
    monitoring: MonitoringSection = Field(default_factory=MonitoringSection)
    config_hash: str | None = Field(default=None, description="Hash of the `up` config.")
    stages: dict[str, StageResult] = Field(default_factory=dict, description="Last `up`'s stages.")
    created_at: float = Field(default_factory=time.time, description="First `up` (epoch).")
    updated_at: float = Field(default_factory=time.time, description="Last write (epoch).")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if isinstance(data, dict) and "format" not in data and _V1_KEYS & data.keys():
            return migrate_v1(data)
        return data

    @property
    def local(self) -> bool:
        """Driven without SSH (`up --local`)."""
        return self.access.local

    @property
    def directory(self) -> Path:
        """This cluster's directory on the controller."""
        return cluster_dir(self.name)

    @property
    def head(self) -> NodeState | None:
        """The head node's record, once preflight has run."""
        return self.nodes[0] if self.nodes else None

    def node(self, name: str) -> NodeState | None:
        """The record of the node named ``name`` (head, worker1, ...), if any."""
        return next((n for n in self.nodes if n.name == name), None)

    def sections(self) -> dict[str, Any]:
        """Each stage-owned section as plain data (to tell which changed)."""
        return {name: self.model_dump(mode="json", include={name}) for name in SECTION_OWNERS}

    def save(self) -> Path:
        """Write the state atomically (0600 file in the 0700 directory) and return its path."""
        self.updated_at = time.time()
        path = ensure_private_dir(self.directory) / STATE_FILE
        write_private(path, self.model_dump_json(indent=2) + "\n")
        return path


def migrate_v1(old: dict[str, Any]) -> dict[str, Any]:
    """A state file of the first (flat) format in the sectioned layout."""
    nodes, ray_nodes, versions = [], {}, {}
    for n in old.get("nodes") or []:
        if isinstance(n, BaseModel):
            n = n.model_dump()
        if not isinstance(n, dict):
            return old  # not the old format either: let validation say what is wrong
        n = dict(n)
        ray_nodes[n.get("name", "")] = {
            "temp_dir": n.pop("ray_temp_dir", None),
            "session": n.pop("ray_session", None),
            "ports": n.pop("ray_ports", None) or {},
            "token_path": n.pop("token_path", None),
        }
        v = n.get("versions") or {}
        versions[n.get("name", "")] = {k: x for k, x in v.items() if k != "python"}
        n["versions"] = {k: x for k, x in v.items() if k == "python"}
        nodes.append(n)
    model = old.get("model")
    is_dir = bool(model) and str(model).startswith(("/", "./", "../", "~"))
    served = old.get("served_model_name")
    edits = old.get("fs_edits") or {}
    return {
        "format": STATE_FORMAT,
        "name": old["name"],
        "access": {
            k: old[k]
            for k in (
                "local",
                "inventory_path",
                "inventory_text",
                "ssh_user",
                "ssh_port",
                "identity_file",
                "known_hosts",
                "strict_host_keys",
                "system_root",
            )
            if old.get(k) is not None
        },
        "shared_dir": old.get("shared_dir"),
        "model": {
            "source": model,
            "repo_id": None if is_dir else model,
            "revision": old.get("revision"),
            "dir": old.get("model_dir"),
            "served_names": [served, *old.get("served_aliases", [])] if served else [],
        },
        "secrets": {"ray_token": old.get("token_path"), "api_key_file": old.get("api_key_file")},
        "nodes": nodes,
        "ports": old.get("ports"),
        # The first format recorded the edits of the cache stage only (which reverts them).
        "storage": {},
        "cache": {"fs_edits": edits},
        "env": {"dir": old.get("env_dir"), "versions": versions},
        "download": {"dir": old.get("model_dir") if not is_dir else None},
        "ray": {"head_token_path": old.get("remote_token_path"), "nodes": ray_nodes},
        "server": {
            "config_digest": old.get("serve_config_hash"),
            "endpoint": old.get("endpoint"),
            "tp": old.get("tp"),
            "pp": old.get("pp"),
            "served_name": served,
            "aliases": old.get("served_aliases", []),
            "remote_api_key_file": old.get("remote_api_key_file"),
        },
        "config_hash": old.get("config_hash"),
        "stages": old.get("stages") or {},
        **{k: old[k] for k in ("created_at", "updated_at") if k in old},
    }


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700 whatever the umask; return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` as a 0600 file."""
    atomic_write(path, text, mode=0o600)


def load_state(name: str) -> ClusterState:
    """Read a cluster's state; a missing one says how to create it or which clusters exist."""
    path = cluster_dir(name) / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = list_clusters()
        raise ConfigError(
            f"no cluster named {name!r} (no {path})",
            hint=f"known clusters: {', '.join(known)}" if known else "run `llamacluster up` first",
        ) from None
    try:
        found = json.loads(text).get("format", 1)
    except (ValueError, AttributeError):
        found = 1
    if isinstance(found, int) and found > STATE_FORMAT:
        raise ConfigError(
            f"cluster state {path} has format {found}, newer than this llamacluster's "
            f"({STATE_FORMAT})",
            hint="use the llamacluster version that wrote it (or a newer one)",
        )
    try:
        return ClusterState.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(
            f"cluster state {path} is unreadable: {exc.errors()[0].get('msg', exc)}",
            hint="fix or remove that file (the cluster may still be running)",
        ) from None


def find_state(name: str) -> ClusterState | None:
    """The cluster's state when one was recorded, else None."""
    return load_state(name) if (cluster_dir(name) / STATE_FILE).exists() else None


def list_clusters() -> list[str]:
    """Names of every cluster with a state file, sorted."""
    root = llamacluster_home() / "clusters"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / STATE_FILE).is_file())


def remove_state(name: str) -> None:
    """Delete a cluster's directory (state and secrets) after a full `down`."""
    import shutil

    shutil.rmtree(cluster_dir(name), ignore_errors=True)


def ensure_secret(path: Path, *, nbytes: int = 32, prefix: str = "") -> tuple[Path, bool]:
    """Create a random hex secret at ``path`` (0600) unless one exists; return (path, created).

    Used for the Ray token and the API key: generated on the controller, never printed.
    """
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        if path.read_text(encoding="utf-8").strip():
            return path, False
    ensure_private_dir(path.parent)
    write_private(path, prefix + secrets.token_hex(nbytes) + "\n")
    return path, True


def config_hash(data: object) -> str:
    """Stable short hash of a JSON-able value (a config's fields), to tell changes apart."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cluster_key(name: str) -> str:
    """A short id of this controller's cluster ``name``: its state directory, hashed.

    Two controllers (or test runs with different LLAMACLUSTER_HOMEs) may both name a cluster
    ``local`` on one host; paths on the nodes carry this key so they never share files.
    """
    return hashlib.sha256(str(cluster_dir(name).absolute()).encode()).hexdigest()[:10]


def remote_cluster_dir(state: ClusterState, node_name: str = "head") -> str:
    """This cluster's private directory on a node (Ray token, API key).

    ``~/.llamacluster/nodes/<name>-<key>``: apart from the controller's ``clusters/`` so a
    controller that is also the head never mixes the two.
    """
    rec = state.node(node_name)
    home = rec.home if rec is not None and rec.home else "~"
    return f"{home}/.llamacluster/nodes/{state.name}-{cluster_key(state.name)}"
