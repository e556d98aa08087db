"""`llamacluster ssh`: a shell or one command on a node of a recorded cluster, via the real sshd."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
import pytest

from cluster.cli.ssh_cmd import split_node_and_command
from cluster.errors import ConfigError
from cluster.node_shell import pick_node, shell_argv
from cluster.state import Access, ClusterState

CLI = [str(Path(sys.executable).parent / "llamacluster")]


@pytest.fixture
def recorded(sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A cluster state for the two loopback sshd nodes (127.0.0.2 head, 127.0.0.3 worker1)."""
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(home))
    inventory = "\n".join(f"{sshd.user}@{a}:{sshd.port}" for a in sshd.addresses) + "\n"
    ClusterState(
        name="t",
        access=Access(
            inventory_text=inventory,
            identity_file=str(sshd.client_key),
            known_hosts=str(tmp_path / "known_hosts"),
        ),
    ).save()
    return {**os.environ, "LLAMACLUSTER_HOME": str(home)}


def test_pick_node_by_index_name_and_address(recorded) -> None:
    assert pick_node("t").host == "127.0.0.2"
    assert pick_node("t", "1").host == "127.0.0.3"
    assert pick_node("t", "worker1").host == "127.0.0.3"
    assert pick_node("t", "127.0.0.3").index == 1
    with pytest.raises(ConfigError, match="no node matches"):
        pick_node("t", "7")


def test_argv_uses_the_runner_policy(recorded, sshd) -> None:
    argv = shell_argv("t", "1", command="hostname")
    assert argv[0] == "ssh" and argv[-2:] == ["127.0.0.3", "hostname"]
    assert "-t" in argv and "BatchMode=yes" not in argv
    assert "StrictHostKeyChecking=accept-new" in argv
    assert argv[argv.index("-i") + 1] == str(sshd.client_key)
    assert any(a.startswith("UserKnownHostsFile=") for a in argv)
    # An interactive shell: no command, no forced -t (ssh allocates one for a terminal).
    assert shell_argv("t")[-1] == "127.0.0.2"


def test_split_node_and_command() -> None:
    assert split_node_and_command(["--", "uname", "-a"], "uname", ["-a"]) == (None, ["uname", "-a"])
    assert split_node_and_command(["1", "--", "uname"], "1", ["uname"]) == ("1", ["uname"])
    assert split_node_and_command(["1"], "1", []) == ("1", [])


@pytest.mark.timeout(120)
def test_command_runs_on_second_node_with_a_terminal(recorded) -> None:
    child = pexpect.spawn(
        CLI[0],
        [*CLI[1:], "ssh", "--name", "t", "1", "--", "sh", "-c",
         'echo "conn=$SSH_CONNECTION tty=$(tty)"; exit 7'],
        env=recorded, encoding="utf-8", timeout=60,
    )  # fmt: skip
    child.expect(r"conn=(\S+) \d+ (\S+) \d+ tty=(\S+)")
    _client, server, tty = child.match.groups()
    assert server == "127.0.0.3"
    assert tty.startswith("/dev/pts/")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7


@pytest.mark.timeout(120)
def test_interactive_shell_on_the_head_by_default(recorded) -> None:
    child = pexpect.spawn(
        CLI[0], [*CLI[1:], "ssh", "--name", "t"], env=recorded, encoding="utf-8", timeout=60
    )
    child.sendline('echo "where=${SSH_CONNECTION#* * }"; exit 3')
    child.expect(r"where=(\S+) \d+")
    assert child.match.group(1) == "127.0.0.2"
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3


def test_strict_host_keys_recorded_by_up_are_honoured_by_exec_and_status(
    sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster brought up with --strict-host-keys refuses a host whose key is unknown in every
    later command, where the default policy (accept new keys) lets it through."""
    from cluster.lifecycle import exec_command

    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))
    inventory = f"{sshd.user}@127.0.0.2:{sshd.port}\n"
    for name, strict in (("strict", True), ("lenient", False)):
        ClusterState(
            name=name,
            access=Access(
                inventory_text=inventory,
                identity_file=str(sshd.client_key),
                known_hosts=str(tmp_path / f"known_hosts-{name}"),  # empty: the host is unknown
                strict_host_keys=strict,
            ),
        ).save()
    refused = exec_command("strict", "echo reached", timeout=60)
    (result,) = refused.values()
    assert not result.ok and "reached" not in result.stdout
    assert "host key" in (result.stderr + result.stdout).lower()
    accepted = exec_command("lenient", "echo reached", timeout=60)
    (result,) = accepted.values()
    assert result.ok and "reached" in result.stdout
    # Once the key is known, the strict cluster reaches the node as well.
    (tmp_path / "known_hosts-strict").write_text((tmp_path / "known_hosts-lenient").read_text())
    (result,) = exec_command("strict", "echo reached", timeout=60).values()
    assert result.ok and "reached" in result.stdout
