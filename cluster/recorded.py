"""One recorded cluster: the name leads to its state, inventory, SSH settings as `up` recorded
them, runners, API target and secrets. Every command that works on an existing cluster (down,
status, exec, logs, tunnel, ssh, bench --name, chat --name, the demo) starts here."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from cluster.errors import ConfigError, NotReadyError
from cluster.inventory import Cluster, Node, local_cluster, parse_inventory
from cluster.keys import read_api_key
from cluster.runner import Runner, SSHConfig, runner_for
from cluster.state import ClusterState, load_state


def ssh_config_of(state: ClusterState, *, multiplex: bool = True) -> SSHConfig:
    """The SSH settings `up` used for this cluster (known hosts, strict host keys)."""
    return SSHConfig(
        known_hosts_file=Path(state.access.known_hosts) if state.access.known_hosts else None,
        strict_host_keys=state.access.strict_host_keys,
        multiplex=multiplex,
    )


def inventory_of(state: ClusterState) -> Cluster:
    """The inventory recorded by `up`, parsed again with the same flags."""
    if state.local:
        return local_cluster()
    return parse_inventory(
        state.access.inventory_text,
        source=state.access.inventory_path or "<inventory>",
        default_user=state.access.ssh_user,
        default_port=state.access.ssh_port,
        identity_file=state.access.identity_file,
    )


@dataclass
class RecordedCluster:
    """A cluster as its state file records it; cheap to make, reads nodes only when asked."""

    state: ClusterState

    @classmethod
    def load(cls, name: str) -> RecordedCluster:
        """The cluster named ``name``; a one-line error names the known ones when missing."""
        return cls(load_state(name))

    @property
    def name(self) -> str:
        """The cluster's name."""
        return self.state.name

    @cached_property
    def inventory(self) -> Cluster:
        """Its nodes, head first, as `up` parsed them."""
        return inventory_of(self.state)

    def ssh_config(self, *, multiplex: bool = True) -> SSHConfig:
        """SSH as `up` used it; ``multiplex=False`` for sessions a person keeps open."""
        return ssh_config_of(self.state, multiplex=multiplex)

    def runners(self, nodes: list[str] | None = None) -> list[Runner]:
        """One runner per node (or per selected node: index, name, host or address), head first."""
        picked = self.inventory.select(nodes) if nodes else tuple(self.inventory)
        ssh = self.ssh_config()
        return [runner_for(n, ssh_config=ssh) for n in picked]

    def head_runner(self) -> Runner:
        """The runner of the head node."""
        return runner_for(self.inventory.head, ssh_config=self.ssh_config())

    def pick_node(self, selector: str | None = None) -> Node:
        """The node ``selector`` names (see Cluster.select); the head when None."""
        if selector is None:
            return self.inventory.head
        picked = self.inventory.select([selector])
        if len(picked) > 1:
            choices = ", ".join(f"{n.index}: {n.name} ({n.label})" for n in picked)
            raise ConfigError(
                f"{selector!r} matches {len(picked)} nodes", hint=f"name one of: {choices}"
            )
        return picked[0]

    def api_key(self) -> str | None:
        """The key a client of this cluster sends (the first of its key file), if any."""
        path = self.state.secrets.api_key_file
        return read_api_key(path) if path else None

    def require_endpoint(self) -> str:
        """The endpoint (``http://HOST:PORT``, no /v1); a clear error when nothing is served."""
        if not self.state.server.endpoint:
            raise NotReadyError(
                f"cluster {self.name!r} serves no endpoint",
                hint=f"run `llamacluster up --name {self.name}` "
                f"(or `llamacluster status --name {self.name}`)",
            )
        return self.state.server.endpoint.rstrip("/")

    def secrets(self) -> list[str]:
        """Secret values that output and logs must never show: Ray token, API keys, HF token."""
        values = [os.environ.get("HF_TOKEN", ""), os.environ.get("HUGGING_FACE_HUB_TOKEN", "")]
        for path in (self.state.secrets.ray_token, self.state.secrets.api_key_file):
            if path:
                with contextlib.suppress(OSError):
                    values += Path(path).read_text(encoding="utf-8").split()
        return [v for v in values if v]


def person_ssh(state: ClusterState) -> SSHConfig:
    """SSH settings for a session a person keeps open (a shell, a tunnel): no shared master."""
    return replace(ssh_config_of(state), multiplex=False)
