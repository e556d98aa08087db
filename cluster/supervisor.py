"""Keep one node's Ray running: a systemd unit, or a small supervisor process; STDLIB ONLY.

Two forms, one job: when the node's raylet is gone, start the node's Ray again with the same
``ray start`` command, environment and token file `up` used, with a capped backoff, so the node
rejoins the head by itself.

- **systemd** (real hosts booted with it): a unit per cluster and node
  (``llamacluster-ray-<cluster>-<key>-<node>.service``) running ``ray start ... --block`` with
  ``Restart=on-failure``, enabled at boot. ``install_unit`` / ``remove_unit`` write and remove
  exactly that file under a root (tests use a temp root), atomically; a second install with the
  same text changes nothing. Shipped to nodes like cluster/fscache.py: the controller sends this
  module's source on stdin (``python3 - install-unit --root / ...``).
- **process** (no systemd: containers, the namespace test nodes): ``python -m cluster.supervisor
  run ... -- <ray start argv>`` started detached by `up`. It becomes the leader of a new
  session, so its pid is the session id of every Ray process it starts (the ids `up` records and
  `down` stops by). It runs ``ray start`` once and writes ``<sid> <exit code>`` to a status file
  (what `up` waits for); then it checks every ``interval`` seconds that a raylet of its session
  still runs, and when it is gone, stops what is left of the session (never itself), waits
  ``backoff_delay(attempt)`` and starts Ray again. SIGTERM (what `down` sends, by its pid) ends
  it without a restart.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

#: Where system units live, relative to the root.
UNIT_DIR = "etc/systemd/system"
#: What marks a unit file as one this module wrote (its first line starts with it).
UNIT_MARK = "# llamacluster:"
#: Default backoff of the process supervisor: first wait, cap, and how long Ray must stay up
#: before the attempt count starts over.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
RESET_AFTER_S = 120.0
#: Seconds between two looks at the raylet.
CHECK_INTERVAL_S = 1.0
#: Consecutive looks without a raylet before a restart (a raylet between two starts is not gone).
MISSES_BEFORE_RESTART = 2
#: Seconds the rest of a broken session gets after TERM before KILL.
STOP_GRACE_S = 10.0
# systemd's own restart pacing: RestartSec, then growing to RestartMaxDelaySec over
# RestartSteps restarts (systemd 254+; older versions ignore the last two keys with a warning).
UNIT_RESTART_SEC = 5
UNIT_RESTART_STEPS = 5
UNIT_RESTART_MAX_S = 60


def backoff_delay(
    attempt: int, *, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S
) -> float:
    """Seconds to wait before restart ``attempt`` (1 is the first): ``base × 2^(attempt-1)``,
    never more than ``cap``."""
    if attempt < 1:
        return 0.0
    return min(cap, base * 2 ** min(attempt - 1, 30))


# ---------------------------------------------------------------------------------------------
# systemd


def unit_name(cluster: str, key: str, node: str) -> str:
    """The unit of node ``node`` (head, worker1, ...) of cluster ``cluster`` (its name and the
    controller's key of it): two clusters, or two nodes sharing a host, never share a unit."""
    return f"llamacluster-ray-{cluster}-{key}-{node}.service"


def _systemd_word(word: str) -> str:
    """One argument of ExecStart= (or one Environment= assignment) as systemd reads it back:
    quoted when it holds blanks or quotes; ``%`` and ``$`` doubled (no specifier, no variable)."""
    text = word.replace("%", "%%").replace("$", "$$")
    if text and not any(c in text for c in " \t\"'\\;"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(
    *,
    cluster: str,
    node: str,
    user: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    temp_dir: str,
) -> str:
    """The unit that runs ``argv`` (the node's ``ray start``; ``--block`` is added so systemd
    watches the node's Ray) as ``user`` with ``env``, restarts it when it fails, with a pause
    that grows to UNIT_RESTART_MAX_S, and starts it at boot. It names the token file (in
    ``env``), never the token."""
    command = [*argv, "--block"] if "--block" not in argv else list(argv)
    lines = [
        f"{UNIT_MARK} Ray of cluster {cluster}, node {node}; written by `llamacluster up`, "
        "removed by `llamacluster down --purge`",
        "[Unit]",
        f"Description=llamacluster Ray ({cluster}, {node})",
        "Wants=network-online.target",
        "After=network-online.target",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        *(f"Environment={_systemd_word(f'{k}={v}')}" for k, v in env.items()),
        f"ExecStartPre=/bin/mkdir -p {_systemd_word(temp_dir)}",
        "ExecStart=" + " ".join(_systemd_word(w) for w in command),
        "Restart=on-failure",
        f"RestartSec={UNIT_RESTART_SEC}",
        f"RestartSteps={UNIT_RESTART_STEPS}",
        f"RestartMaxDelaySec={UNIT_RESTART_MAX_S}",
        "KillMode=control-group",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def unit_path(root: str, name: str) -> str:
    """Where unit ``name`` lives under ``root``."""
    if "/" in name or not name.endswith(".service"):
        raise ValueError(f"not a unit name: {name!r}")
    return os.path.join(root, UNIT_DIR, name)


def _atomic_write(path: str, text: str, *, mode: int) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def install_unit(root: str, name: str, text: str) -> bool:
    """Write unit ``name`` under ``root`` unless it already holds exactly ``text``; True when
    written. A file of that name that this module did not write is refused (ValueError)."""
    if not text.startswith(UNIT_MARK):
        raise ValueError("refusing to install a unit text without llamacluster's mark")
    path = unit_path(root, name)
    try:
        with open(path, encoding="utf-8") as fh:
            old = fh.read()
    except FileNotFoundError:
        old = None
    if old == text:
        return False
    if old is not None and not old.startswith(UNIT_MARK):
        raise ValueError(f"{path} exists and was not written by llamacluster: left alone")
    _atomic_write(path, text, mode=0o644)
    return True


def remove_unit(root: str, name: str) -> bool:
    """Remove unit ``name`` under ``root`` when this module wrote it; True when removed."""
    path = unit_path(root, name)
    try:
        with open(path, encoding="utf-8") as fh:
            if not fh.read().startswith(UNIT_MARK):
                return False
    except FileNotFoundError:
        return False
    os.unlink(path)
    return True


# ---------------------------------------------------------------------------------------------
# The process supervisor


def session_members(sid: int, *, uid: int | None = None) -> list[tuple[int, str, str]]:
    """``(pid, comm, cmdline)`` of every live (not zombie) process of session ``sid`` and user
    ``uid`` (default: this one), read from /proc."""
    uid = os.getuid() if uid is None else uid
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append((int(entry), comm, cmdline))
    return found


def raylet_running(sid: int, temp_dir: str) -> bool:
    """A raylet of session ``sid`` runs that names ``temp_dir`` (this cluster's)."""
    return any(c == "raylet" and temp_dir in cmd for _, c, cmd in session_members(sid))


def stop_session_rest(sid: int, *, keep: int, grace_s: float = STOP_GRACE_S) -> list[int]:
    """TERM every process of session ``sid`` but ``keep`` (the supervisor), wait ``grace_s``,
    KILL what is left; return the pids signalled."""

    def rest() -> list[int]:
        return [p for p, _, _ in session_members(sid) if p != keep]

    pids = rest()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in rest():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while rest() and time.monotonic() < deadline:
            time.sleep(0.1)
    return pids


class Supervisor:
    """Start the node's Ray, then start it again whenever its raylet is gone (see the module
    docstring). ``start`` runs ``ray start`` and returns its exit code; the clock and sleep are
    parameters so the loop's decisions can be tested with a fake Ray."""

    def __init__(
        self,
        *,
        temp_dir: str,
        start: Callable[[], int],
        alive: Callable[[], bool],
        clean: Callable[[], object],
        say: Callable[[str], None],
        interval: float = CHECK_INTERVAL_S,
        base: float = BACKOFF_BASE_S,
        cap: float = BACKOFF_CAP_S,
        reset_after: float = RESET_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.temp_dir = temp_dir
        self.start, self.alive, self.clean, self.say = start, alive, clean, say
        self.interval, self.base, self.cap, self.reset_after = interval, base, cap, reset_after
        self.clock = clock
        self.stopping = False
        self.restarts = 0

    def stop(self, *_: object) -> None:
        """Ask the loop to end (SIGTERM's handler): no further restart."""
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        end = self.clock() + seconds
        while not self.stopping and self.clock() < end:
            time.sleep(min(0.2, max(0.0, end - self.clock())))

    def loop(self) -> int:
        """Watch and restart until stopped; returns 0."""
        attempt, misses, up_since = 0, 0, self.clock()
        while not self.stopping:
            self._sleep(self.interval)
            if self.stopping:
                break
            if self.alive():
                misses = 0
                if attempt and self.clock() - up_since >= self.reset_after:
                    attempt = 0  # up long enough: the next fault starts the backoff over
                continue
            misses += 1
            if misses < MISSES_BEFORE_RESTART:
                continue
            attempt += 1
            delay = backoff_delay(attempt, base=self.base, cap=self.cap)
            self.say(f"raylet gone; restarting Ray in {delay:g} s (attempt {attempt})")
            self.clean()
            self._sleep(delay)
            if self.stopping:
                break
            rc = self.start()
            misses = 0
            if rc == 0:
                self.restarts += 1
                up_since = self.clock()
                self.say(f"Ray started again (restart {self.restarts})")
            else:
                self.say(f"ray start failed with exit {rc}; cleaning up, trying again")
                self.clean()
        self.say("stopping: asked to (SIGTERM); Ray is left to the caller")
        return 0


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    """The ``run`` command: lead a new session, start Ray, report, then supervise."""
    if os.getsid(0) != os.getpid():
        os.setsid()
    sid = os.getpid()
    sup = Supervisor(
        temp_dir=args.temp_dir,
        start=lambda: _ray_start(args.argv, args.log),
        alive=lambda: raylet_running(sid, args.temp_dir),
        clean=lambda: stop_session_rest(sid, keep=sid),
        say=_say,
        interval=args.interval,
        base=args.backoff,
        cap=args.backoff_max,
    )
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, sup.stop)
    rc = _ray_start(args.argv, args.log)
    _atomic_write(args.status_file, f"{sid} {rc}\n", mode=0o600)
    if rc != 0:
        _say(f"first ray start failed with exit {rc}: not supervising")
        return rc
    _say(f"Ray started (session {sid}); watching its raylet every {args.interval:g} s")
    return sup.loop()


def _ray_start(argv: Sequence[str], log: str) -> int:
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.run(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cluster.supervisor", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="start the node's Ray and keep it running")
    r.add_argument("--temp-dir", required=True, help="this cluster's Ray temp dir")
    r.add_argument("--status-file", required=True, help="'<sid> <rc>' of the first start")
    r.add_argument("--log", required=True, help="output of the latest ray start")
    r.add_argument("--interval", type=float, default=CHECK_INTERVAL_S)
    r.add_argument("--backoff", type=float, default=BACKOFF_BASE_S)
    r.add_argument("--backoff-max", type=float, default=BACKOFF_CAP_S)
    r.add_argument("argv", nargs=argparse.REMAINDER, help="-- ray start ...")
    for name in ("install-unit", "remove-unit"):
        u = sub.add_parser(name)
        u.add_argument("--root", default="/")
        u.add_argument("--name", required=True)
        if name == "install-unit":
            u.add_argument("--text-b64", required=True, help="the unit text, base64")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``install-unit``/``remove-unit`` print ``changed`` or ``unchanged``."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        args.argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not args.argv:
            print("cluster.supervisor run: no ray start command after --", file=sys.stderr)
            return 3
        return run(args)
    try:
        if args.command == "install-unit":
            text = base64.b64decode(args.text_b64).decode()
            changed = install_unit(args.root, args.name, text)
        else:
            changed = remove_unit(args.root, args.name)
    except (ValueError, OSError) as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    print("changed" if changed else "unchanged")
    return 0


def script_command(command: str, *args: str, python: str = "python3", sudo: str = "") -> str:
    """The shell command that runs this module on a node (its source goes on stdin)."""
    from cluster.stdin_program import stdin_command

    return stdin_command(command, *args, python=python, sudo=sudo)


def script_source() -> str:
    """This module's source, to send on stdin with ``script_command``."""
    from cluster.stdin_program import source_of

    return source_of(__file__)


if __name__ == "__main__":
    sys.exit(main())
