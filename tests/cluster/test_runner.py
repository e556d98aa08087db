"""The runners against a real sshd on loopback, and the local runner on this machine."""

from __future__ import annotations

import io
import logging
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from cluster.errors import NodesFailedError, RemoteError
from cluster.inventory import Node, local_cluster
from cluster.runner import (
    LocalRunner,
    OutputLine,
    SSHConfig,
    SSHRunner,
    command_string,
    prefixed_printer,
    run_on_nodes,
    runner_for,
    ssh_argv,
)

pytestmark = pytest.mark.timeout(60)


def _cmdlines() -> list[str]:
    """The command line of every process on this machine (the "remote" side is here too)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            found.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_runs_on_two_nodes_in_parallel(sshd, tmp_path):
    runners = sshd.runners()
    hosts = [r.node.host for r in runners]

    def rendezvous(where: Path):
        def cmd(node: Node) -> str:
            # Each node marks its arrival and waits for the other: only a parallel run passes.
            other = next(h for h in hosts if h != node.host)
            return (
                f'echo "$SSH_CONNECTION"; mkdir -p {where}; touch {where}/{node.host}; '
                f"for _ in $(seq 600); do [ -e {where}/{other} ] && exit 0; sleep 0.1; done; exit 9"
            )

        return cmd

    results = run_on_nodes(runners, rendezvous(tmp_path / "a"), timeout=90)
    assert [r.node for r in results.values()] == [r.label for r in runners]
    for runner, res in zip(runners, results.values(), strict=True):
        assert res.ok and res.returncode == 0
        # The remote side saw the connection arrive on this node's own address.
        assert res.stdout.split()[2] == runner.node.host
    sequential = run_on_nodes(
        runners, rendezvous(tmp_path / "b"), parallel=False, timeout=10, check=False
    )
    # One after the other, the first node waits in vain for the second.
    first = next(iter(sequential.values()))
    assert first.timed_out and "127.0.0.2" in first.stdout


def test_argv_command_is_quoted_once(sshd):
    runner = sshd.runners()[0]
    tricky = ["printf", "%s|", "a b", "it's", "$HOME", "x;y", "*"]
    res = runner.run(tricky)
    assert res.ok, res.stderr
    assert res.stdout == "a b|it's|$HOME|x;y|*|"
    assert res.command == command_string(tricky)


def test_every_failed_node_is_named(sshd):
    config = sshd.ssh_config(connect_retries=1)
    good, failing = sshd.runners(config)
    unreachable = SSHRunner(sshd.node("127.0.0.9", index=2), config)

    def cmd(node: Node) -> str:
        return "echo fine" if node.host == "127.0.0.2" else "echo 'disk full on /data' >&2; exit 7"

    with pytest.raises(NodesFailedError) as info:
        run_on_nodes([good, failing, unreachable], cmd, timeout=30)
    err = info.value
    assert isinstance(err, RemoteError) and err.exit_code == 4
    assert err.nodes == [failing.label, unreachable.label]
    by_node = {f.node: f for f in err.failures}
    assert by_node[failing.label].returncode == 7
    assert "disk full on /data" in by_node[failing.label].stderr_tail
    assert not by_node[failing.label].connection_failed
    assert by_node[unreachable.label].returncode == 255
    assert by_node[unreachable.label].connection_failed
    assert "Connection refused" in by_node[unreachable.label].stderr_tail
    text = err.one_line()
    assert "2 of 3" in text and failing.label in text and unreachable.label in text
    assert good.label + " " not in text.split(":", 1)[1]

    # Without check, every node's result comes back and the unreachable one was retried.
    results = run_on_nodes([good, failing, unreachable], cmd, check=False)
    assert [r.returncode for r in results.values()] == [0, 7, 255]
    assert results[unreachable.node].attempts == 2
    assert results[failing.node].attempts == 1  # a failing command is never retried


def test_exit_255_of_the_command_is_not_a_connection_failure(sshd):
    runner = sshd.runners(sshd.ssh_config(connect_retries=3))[0]
    res = runner.run("echo started; exit 255")
    assert res.returncode == 255 and not res.connection_failed and res.attempts == 1


def test_timeout_kills_the_remote_command(sshd):
    runner = sshd.runners()[0]
    assert runner.run("true").ok  # connection up first: the timeout is about the command
    marker = f"sleep {secrets.randbelow(10**6) + 10**6}.5"
    results = []
    worker = threading.Thread(target=lambda: results.append(runner.run(marker, timeout=8)))
    worker.start()
    seen_running = False
    while worker.is_alive():
        seen_running = seen_running or any(marker in c for c in _cmdlines())
        time.sleep(0.1)
    res = results[0]
    assert seen_running, "the command never started on the node"
    assert res.timed_out and not res.ok and res.returncode == 124
    assert 8 <= res.duration_s < 30
    assert "timed out after 8 s" in res.stderr
    # The command on the node is gone too, not only the local ssh process.
    deadline = time.monotonic() + 20
    while any(marker in c for c in _cmdlines()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(marker in c for c in _cmdlines())
    with pytest.raises(NodesFailedError, match="timed out"):
        run_on_nodes([runner], "sleep 20", timeout=1)


def test_live_output_is_prefixed_by_node(sshd):
    runners = sshd.runners()
    seen: list[OutputLine] = []
    lock = threading.Lock()

    def sink(line: OutputLine) -> None:
        with lock:
            seen.append(line)

    run_on_nodes(runners, "echo one; echo two >&2; echo three", on_line=sink)
    for r in runners:
        mine = [(line.stream, line.text) for line in seen if line.node == r.label]
        assert [t for s, t in mine if s == "stdout"] == ["one", "three"]
        # (the node's shell startup files may add their own lines to stderr)
        assert "two" in [t for s, t in mine if s == "stderr"]

    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    run_on_nodes(
        runners,
        "echo hello from $(hostname -I 2>/dev/null | wc -w)",
        on_line=prefixed_printer(console),
    )
    lines = buf.getvalue().splitlines()
    for r in runners:
        assert any(line.startswith(f"[{r.label}] hello from") for line in lines), lines


def test_env_secret_stays_off_command_lines_and_logs(sshd, caplog):
    caplog.set_level(logging.DEBUG, logger="cluster")
    runner = sshd.runners()[0]
    secret = "hf_" + secrets.token_hex(16)
    marker = f"sleep {secrets.randbelow(10**6) + 10**6}.25"
    results = []
    worker = threading.Thread(
        target=lambda: results.append(
            runner.run(
                f'{marker} & sleep 3; kill %1; test "$HF_TOKEN" = "$EXPECTED" && echo arrived',
                env={"HF_TOKEN": secret, "EXPECTED": secret},
            )
        )
    )
    worker.start()
    seen_running = leaked = 0
    while worker.is_alive():  # every process's command line, here and on the node, all along
        lines = _cmdlines()
        seen_running += any(marker in c for c in lines)
        leaked += sum(secret in c for c in lines)
        time.sleep(0.05)
    worker.join()
    res = results[0]
    assert res.ok, res.stderr
    assert res.stdout.strip() == "arrived"
    assert seen_running, "the watcher never saw the command run"
    assert leaked == 0, "the secret was visible in a command line"
    assert secret not in caplog.text and "HF_TOKEN" in caplog.text
    assert secret not in repr(res)
    # A failing command's error message carries no secret either.
    with pytest.raises(NodesFailedError) as info:
        run_on_nodes([runner], "exit 3", env={"HF_TOKEN": secret})
    assert secret not in info.value.one_line()


def test_stdin_reaches_the_command_after_env(sshd):
    runner = sshd.runners()[0]
    res = runner.run("wc -c; echo $K", env={"K": "v"}, stdin=b"x" * 100_000)
    assert res.ok and res.stdout.split() == ["100000", "v"]


def test_changed_host_key_fails_under_strict_policy(sshd, tmp_path):
    node = sshd.node("127.0.0.2")
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong_key = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.2]:{sshd.port} {wrong_key}\n")

    strict = SSHRunner(node, sshd.ssh_config(known_hosts=known, strict=True))
    with pytest.raises(NodesFailedError) as info:
        run_on_nodes([strict], "echo should-not-run")
    failure = info.value.failures[0]
    assert failure.returncode == 255 and failure.connection_failed
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in failure.stderr_tail or (
        "Host key verification failed" in failure.stderr_tail
    )
    assert "ssh-keygen -R" in info.value.one_line()
    assert "should-not-run" not in failure.stderr_tail

    # accept-new refuses a changed key too: it only learns hosts it has never seen.
    lenient = SSHRunner(node, sshd.ssh_config(known_hosts=known))
    assert lenient.run("true").returncode == 255


def test_accept_new_learns_new_hosts_and_strict_needs_them_known(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    strict_runners = sshd.runners(sshd.ssh_config(known_hosts=known, strict=True))
    assert all(r.run("true").returncode == 255 for r in strict_runners)

    results = run_on_nodes(sshd.runners(sshd.ssh_config(known_hosts=known)), "echo ok")
    assert all(r.stdout == "ok\n" for r in results.values())
    host_key = sshd.host_public_key.split()[1]
    for addr in sshd.addresses:
        # Debian hashes known_hosts names: ask ssh-keygen whether the host is in the file.
        found = subprocess.run(
            ["ssh-keygen", "-F", f"[{addr}]:{sshd.port}", "-f", str(known)],
            capture_output=True,
            text=True,
        )
        assert found.returncode == 0 and host_key in found.stdout
    # Now that the hosts are known, the strict policy lets them in.
    strict_again = sshd.runners(sshd.ssh_config(known_hosts=known, strict=True))
    assert all(r.run("true").ok for r in strict_again)


def test_copy_to_file_and_directory(sshd, tmp_path):
    runner = sshd.runners()[1]
    token = tmp_path / "token"
    token.write_text("abc123")
    token.chmod(0o600)
    dest = sshd.workdir / f"remote-{secrets.token_hex(4)}"
    runner.copy_to(token, f"{dest}/secrets/token")
    res = runner.run(["stat", "-c", "%a", f"{dest}/secrets/token"])
    assert res.stdout.strip() == "600"
    assert (dest / "secrets" / "token").read_text() == "abc123"

    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "mod.py").write_text("X = 1\n")
    (project / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (project / "run.sh").chmod(0o755)
    for _ in range(2):  # copying again is safe and gives the same tree
        runner.copy_to(project, f"{dest}/project")
    assert (dest / "project" / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert runner.run(f"{dest}/project/run.sh").stdout == "hi\n"
    assert sorted(p.name for p in (dest / "project").iterdir()) == ["pkg", "run.sh"]

    with pytest.raises(NodesFailedError, match="copying"):
        runner.copy_to(token, "/proc/definitely/not/writable")


def test_user_ssh_config_keeps_working(sshd, tmp_path):
    """Nothing the user's ssh config sets (alias, HostName, Port, User, IdentityFile) is overridden."""
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host lc-alias\n  HostName 127.0.0.3\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n"
    )
    node = Node(index=0, host="lc-alias")
    argv = ssh_argv(node, SSHConfig())
    assert not {"-i", "-p", "-l"} & set(argv)
    runner = SSHRunner(node, sshd.ssh_config(config_file=cfg))
    res = runner.run('echo "$SSH_CONNECTION"')
    assert res.ok, res.stderr
    assert res.stdout.split()[2] == "127.0.0.3"


def test_multiplexing_reuses_one_connection(sshd):
    config = sshd.ssh_config()
    runner = sshd.runners(config)[0]
    first = runner.run("echo $PPID").stdout
    assert runner.run("true").ok
    sockets = list(config.control_dir.iterdir())
    assert len(sockets) == 1 and sockets[0].is_socket()
    assert oct(config.control_dir.stat().st_mode & 0o777) == "0o700"
    assert first.strip().isdigit()
    runner.close()
    deadline = time.monotonic() + 5
    while list(config.control_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(config.control_dir.iterdir())


def test_ssh_argv_options_and_interactive_variant(sshd):
    node = sshd.node()
    argv = ssh_argv(node, sshd.ssh_config(strict=True))
    joined = " ".join(argv)
    for opt in (
        "BatchMode=yes",
        "ConnectTimeout=5",
        "ServerAliveInterval=",
        "ControlMaster=auto",
        "ControlPersist=",
        "StrictHostKeyChecking=yes",
        "IdentitiesOnly=yes",
    ):
        assert opt in joined
    assert argv[-2:] == ["--", "127.0.0.2"]
    assert argv[argv.index("-p") + 1] == str(sshd.port)
    assert "StrictHostKeyChecking=accept-new" in " ".join(ssh_argv(node, SSHConfig()))
    tunnel = ssh_argv(
        node, SSHConfig(), batch=False, extra_args=["-N", "-L", "8000:127.0.0.1:8000"]
    )
    assert "BatchMode=yes" not in " ".join(tunnel) and "-L" in tunnel


def test_local_runner_and_runner_for():
    node = local_cluster().head
    runner = runner_for(node)
    assert isinstance(runner, LocalRunner)
    assert isinstance(runner_for(Node(index=0, host="10.0.0.5")), SSHRunner)
    res = runner.run(["bash", "-c", 'echo "$1:$SECRET"', "_", "arg"], env={"SECRET": "s"})
    assert res.ok and res.stdout == "arg:s\n"
    slow = runner.run("sleep 30 & wait", timeout=0.5)
    assert slow.timed_out and slow.duration_s < 5
    failed = runner.run("echo bad >&2; exit 3")
    assert failed.returncode == 3 and failed.tail(1) == "bad" and not failed.ok
    with pytest.raises(NodesFailedError, match=r"127\.0\.0\.1 \(exit 3\): bad"):
        failed.check()
