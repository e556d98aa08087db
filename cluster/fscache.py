"""NFS and cachefilesd system-file edits for a node; STDLIB ONLY, shipped to nodes as a script.

Runs on a node with the system ``python3`` before any env exists: the controller sends this
module's source on stdin (``python3 - <command> --root / ...``) and reads one JSON line back.
Every edit works under a ``--root`` prefix (tests edit files in a temp root), keeps exactly one
backup (``<file>.llamacluster.bak``, the file as it was before the first edit), writes atomically
with the original mode, leaves the file byte-identical on a second run, and refuses with no write
when it cannot tell which line to change. In fstab and exports each line it adds or changes
follows a marker comment naming the path, and `revert` undoes exactly those lines: whatever an
administrator wrote there later stays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile

BACKUP_SUFFIX = ".llamacluster.bak"
FSTAB = "etc/fstab"
EXPORTS = "etc/exports"
CACHEFILESD_DEFAULT = "etc/default/cachefilesd"
CACHEFILESD_CONF = "etc/cachefilesd.conf"
#: Every file this module may edit, relative to the root; `revert` restores those with a backup.
EDITED_FILES = (FSTAB, EXPORTS, CACHEFILESD_DEFAULT, CACHEFILESD_CONF)
NFS_TYPES = ("nfs", "nfs4")
DEFAULT_CACHE_DIR = "/var/cache/fscache"
# root_squash: a worker's root is nobody on the head's disk, unless the SSH user is root
# (then the workers must write as root: `no_root_squash`, asked for explicitly).
DEFAULT_EXPORT_OPTIONS = "rw,sync,no_subtree_check,root_squash"
# nofail: a head that is down does not hold a worker's boot; the mount gives up after 30 s.
DEFAULT_MOUNT_OPTIONS = "defaults,_netdev,nofail,x-systemd.mount-timeout=30s,timeo=150,fsc"
#: Marker comments in fstab/exports: the line after one is this module's (``<kind> <path>``).
MARK_PREFIX = "# llamacluster:"
MARK_SUFFIX = "(llamacluster down --purge undoes the next line)"
#: Files whose edits are undone line by line (the others are put back from their backup).
MARKED_FILES = (FSTAB, EXPORTS)

# Exit codes of the script (the controller maps them to messages).
EXIT_OK = 0
EXIT_REFUSED = 2  # ambiguous or conflicting line: nothing written
EXIT_USAGE = 3


class Refused(Exception):
    """The edit cannot be made safely; nothing was written."""


# ---------------------------------------------------------------------------------------------
# Files: read, atomic write with one backup, revert.


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def write_file(path: str, text: str, *, default_mode: int = 0o644) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; return True if written.

    The first write keeps the old file as ``<path>.llamacluster.bak`` (an empty backup marker
    when the file did not exist: reverting then removes the file). The write is a temp file in
    the same directory, fsynced, with the original mode, then renamed over the target.
    """
    old = _read(path)
    if old == text:
        return False
    backup = path + BACKUP_SUFFIX
    if not os.path.exists(backup):
        if old is None:
            _atomic_write(backup + ".absent", "", mode=0o600)
            _atomic_write(backup, "", mode=0o600)
        else:
            _atomic_write(backup, old, mode=os.stat(path).st_mode & 0o7777)
    mode = os.stat(path).st_mode & 0o7777 if old is not None else default_mode
    _atomic_write(path, text, mode=mode)
    return True


def _atomic_write(path: str, text: str, *, mode: int) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _mark(kind: str, path: str) -> str:
    return f"{MARK_PREFIX} {kind} {_escape(_norm(path))} {MARK_SUFFIX}\n"


def _parse_mark(line: str) -> tuple[str, str] | None:
    text = line.strip()
    if not (text.startswith(MARK_PREFIX) and text.endswith(MARK_SUFFIX)):
        return None
    words = text[len(MARK_PREFIX) : -len(MARK_SUFFIX)].split()
    return (words[0], _unescape(words[1])) if len(words) == 2 else None


def _without_fsc(line: str) -> str:
    f = _fields(line)
    if len(f) < 4:
        return line
    options = [o for o in f[3].group().split(",") if o != "fsc"] or ["defaults"]
    return _replace_field(line, f[3], ",".join(options))


def unmark(text: str) -> str:
    """``text`` less this module's edits: each marker goes; the line after it is removed (a
    mount or export line) or loses ``fsc`` (an fsc edit) only when it still names the marker's
    path. Every other line, an administrator's next to ours included, stays as it is."""
    lines = _lines(text)
    out: list[str] = []
    i = 0
    while i < len(lines):
        mark = _parse_mark(lines[i])
        if mark is None:
            out.append(lines[i])
            i += 1
            continue
        kind, path = mark
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        f = _fields(nxt)
        target = {"mount": 1, "fsc": 1, "export": 0}.get(kind)
        ours = target is not None and len(f) > target
        ours = ours and _norm(_unescape(f[target].group())) == _norm(path)
        i += 1
        if not ours:
            continue  # only the marker: the line after it is not (or no longer) ours
        if kind == "fsc":
            out.append(_without_fsc(nxt))
        i += 1
    return "".join(out)


def revert(root: str) -> dict:
    """Undo every edit: fstab and exports lose exactly the marked lines (or the ``fsc`` added
    to one), cachefilesd's files go back to their backups; the backups are dropped."""
    restored, removed = [], []
    for rel in EDITED_FILES:
        path = _path(root, rel)
        backup = path + BACKUP_SUFFIX
        if rel in MARKED_FILES:  # marked lines go even if someone removed the backup
            text = _read(path)
            left = unmark(text) if text is not None else None
            if left is not None and not left.strip() and os.path.exists(backup + ".absent"):
                os.unlink(path)
                removed.append("/" + rel)
            elif left is not None and left != text:
                _atomic_write(path, left, mode=os.stat(path).st_mode & 0o7777)
                restored.append("/" + rel)
            for leftover in (backup + ".absent", backup):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            continue
        if not os.path.exists(backup):
            continue
        if os.path.exists(backup + ".absent"):
            if os.path.exists(path):
                os.unlink(path)
            os.unlink(backup + ".absent")
            removed.append("/" + rel)
        else:
            mode = os.stat(backup).st_mode & 0o7777
            _atomic_write(path, _read(backup) or "", mode=mode)
            restored.append("/" + rel)
        os.unlink(backup)
    changed = bool(restored or removed)
    return {"changed": changed, "restored": restored, "removed": removed}


# ---------------------------------------------------------------------------------------------
# fstab parsing: fields are replaced in place so spacing and comments survive.

_FIELD_RE = re.compile(r"\S+")


def _unescape(field: str) -> str:
    """fstab escapes spaces and tabs in paths as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


def _norm(path: str) -> str:
    return os.path.normpath(path) if path else path


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _fields(line: str) -> list[re.Match[str]]:
    if line.lstrip().startswith("#") or not line.strip():
        return []
    return list(_FIELD_RE.finditer(line.rstrip("\r\n")))


def _is_under(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def nfs_candidates(text: str, shared_dir: str) -> list[int]:
    """Indexes of the fstab lines that mount NFS at ``shared_dir`` or the nearest directory above it."""
    shared = _norm(shared_dir)
    best: list[tuple[int, int]] = []
    for i, line in enumerate(_lines(text)):
        f = _fields(line)
        if len(f) < 4 or f[2].group() not in NFS_TYPES:
            continue
        mnt = _norm(_unescape(f[1].group()))
        if _is_under(shared, mnt):
            best.append((len(mnt), i))
    if not best:
        return []
    longest = max(n for n, _ in best)
    return [i for n, i in best if n == longest]


def _with_option(options: str, option: str) -> str:
    parts = options.split(",")
    if option in parts:
        return options
    if parts == ["defaults"]:
        return f"defaults,{option}"
    return options + "," + option


def _replace_field(line: str, match: re.Match[str], value: str) -> str:
    return line[: match.start()] + value + line[match.end() :]


def add_fsc(root: str, shared_dir: str) -> dict:
    """Add ``fsc`` to the options of the NFS line of ``/etc/fstab`` that holds ``shared_dir``.

    No line: a warning and no write (a provider mount without an fstab line cannot be changed
    here). Several lines for the same mount point: Refused, nothing written.
    """
    path = _path(root, FSTAB)
    text = _read(path)
    if text is None:
        return {"changed": False, "skipped": True, "warning": "no /etc/fstab: fsc not added"}
    hits = nfs_candidates(text, shared_dir)
    if not hits:
        return {
            "changed": False,
            "skipped": True,
            "warning": f"no NFS line in /etc/fstab mounts {shared_dir}: fsc not added "
            "(a provider mount without an fstab line is left as it is; add fsc to its mount "
            "options yourself to cache it)",
        }
    lines = _lines(text)
    if len(hits) > 1:
        listing = "; ".join(f"line {i + 1}: {lines[i].strip()}" for i in hits)
        raise Refused(
            f"/etc/fstab has {len(hits)} NFS lines for the mount of {shared_dir} ({listing}); "
            "keep one and run again"
        )
    i = hits[0]
    f = _fields(lines[i])
    mountpoint = _unescape(f[1].group())
    options = f[3].group()
    new_options = _with_option(options, "fsc")
    if new_options == options:
        return {"changed": False, "mountpoint": mountpoint, "line": i + 1}
    lines[i] = _mark("fsc", mountpoint) + _replace_field(lines[i], f[3], new_options)
    changed = write_file(path, "".join(lines))
    return {"changed": changed, "mountpoint": mountpoint, "line": i + 2}


def _ensure_trailing_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def add_mount(
    root: str, *, server: str, shared_dir: str, options: str = DEFAULT_MOUNT_OPTIONS
) -> dict:
    """Add the worker's fstab line mounting ``server:shared_dir`` at ``shared_dir`` (--nfs-server head).

    Already there (same source, same mount point): unchanged. Another line mounts something
    else there: Refused.
    """
    path = _path(root, FSTAB)
    text = _read(path) or ""
    want_src = f"{server}:{_norm(shared_dir)}"
    same = []
    for i, line in enumerate(_lines(text)):
        f = _fields(line)
        if len(f) >= 2 and _norm(_unescape(f[1].group())) == _norm(shared_dir):
            same.append((i, f))
    if len(same) > 1:
        raise Refused(f"/etc/fstab has {len(same)} lines for {shared_dir}; keep one and run again")
    if same:
        i, f = same[0]
        if _unescape(f[0].group()) == want_src and len(f) >= 3 and f[2].group() in NFS_TYPES:
            return {"changed": False, "line": i + 1}
        raise Refused(
            f"/etc/fstab line {i + 1} already mounts {f[0].group()} at {shared_dir}; "
            "remove it or pick another --shared-dir"
        )
    line = f"{_escape(want_src)} {_escape(_norm(shared_dir))} nfs4 {options} 0 0\n"
    changed = write_file(path, _ensure_trailing_newline(text) + _mark("mount", shared_dir) + line)
    return {"changed": changed, "line": len(_lines(text)) + 2}


def add_export(
    root: str, *, shared_dir: str, clients: list[str], options: str = DEFAULT_EXPORT_OPTIONS
) -> dict:
    """Export ``shared_dir`` to ``clients`` in ``/etc/exports`` (--nfs-server head).

    One existing line for that directory is left as the user wrote it; several: Refused.
    """
    path = _path(root, EXPORTS)
    text = _read(path) or ""
    same = []
    for i, line in enumerate(_lines(text)):
        f = _fields(line)
        if f and _norm(_unescape(f[0].group())) == _norm(shared_dir):
            same.append(i)
    if len(same) > 1:
        raise Refused(
            f"/etc/exports has {len(same)} lines for {shared_dir}; keep one and run again"
        )
    if same:
        return {"changed": False, "line": same[0] + 1}
    hosts = " ".join(f"{c}({options})" for c in clients)
    changed = write_file(
        path,
        _ensure_trailing_newline(text)
        + _mark("export", shared_dir)
        + f"{_escape(_norm(shared_dir))} {hosts}\n",
    )
    return {"changed": changed, "line": len(_lines(text)) + 2}


# ---------------------------------------------------------------------------------------------
# cachefilesd: RUN=yes and the cache directory.

_RUN_RE = re.compile(r"^\s*#?\s*RUN\s*=")
_DIR_RE = re.compile(r"^\s*#?\s*dir\s")


def _set_line(text: str, pattern: re.Pattern[str], new_line: str) -> str:
    """Replace the first active line matching, else the first commented one, else append."""
    lines = _lines(text)
    active = [
        i for i, ln in enumerate(lines) if pattern.match(ln) and not ln.lstrip().startswith("#")
    ]
    commented = [
        i for i, ln in enumerate(lines) if pattern.match(ln) and ln.lstrip().startswith("#")
    ]
    if len(active) > 1:
        raise Refused(
            f"several lines set {new_line.split()[0].split('=')[0]}; keep one and run again"
        )
    target = active[0] if active else (commented[0] if commented else None)
    if target is None:
        return _ensure_trailing_newline(text) + new_line + "\n"
    ending = "\n" if lines[target].endswith("\n") else ""
    lines[target] = new_line + ending
    return "".join(lines)


def configure_cachefilesd(root: str, *, cache_dir: str = DEFAULT_CACHE_DIR) -> dict:
    """Set ``RUN=yes`` in /etc/default/cachefilesd and ``dir <cache_dir>`` in /etc/cachefilesd.conf."""
    changed = []
    for rel, pattern, line in (
        (CACHEFILESD_DEFAULT, _RUN_RE, "RUN=yes"),
        (CACHEFILESD_CONF, _DIR_RE, f"dir {cache_dir}"),
    ):
        path = _path(root, rel)
        text = _read(path) or ""
        if write_file(path, _set_line(text, pattern, line)):
            changed.append("/" + rel)
    return {"changed": bool(changed), "files": changed}


# ---------------------------------------------------------------------------------------------
# Command plans for the real system (run by the cache/storage stages, shown by --dry-run).


def _q(path: str) -> str:
    return shlex.quote(path)


def install_cachefilesd_commands(sudo: str = "") -> list[str]:
    """Install and start cachefilesd (Debian/Ubuntu)."""
    s = f"{sudo} " if sudo else ""
    return [
        f"dpkg -s cachefilesd >/dev/null 2>&1 || {s}env DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -q cachefilesd",
        f"{s}systemctl enable --now cachefilesd",
    ]


def remount_commands(mountpoint: str, sudo: str = "") -> list[str]:
    """Full unmount and mount: the kernel refuses to change ``fsc`` on a remount.

    Must run before the shared env or Ray hold files open on the mount; a busy mount fails here
    instead of being forced.
    """
    s = f"{sudo} " if sudo else ""
    return [f"{s}umount {_q(mountpoint)}", f"{s}mount {_q(mountpoint)}"]


def check_fsc_command(mountpoint: str) -> str:
    """Exit 0 when the NFS volume mounted at ``mountpoint`` has ``FSC yes`` in /proc/fs/nfsfs/volumes."""
    return (
        f"dev=$(findmnt -n -o MAJ:MIN --target {_q(mountpoint)}) && "
        'awk -v d="$dev" \'NR>1 && $4==d && $NF=="yes" {ok=1} END {exit !ok}\' /proc/fs/nfsfs/volumes'
    )


def export_commands(sudo: str = "") -> list[str]:
    """Install and (re)load the NFS server on the head after /etc/exports changed."""
    s = f"{sudo} " if sudo else ""
    return [
        f"dpkg -s nfs-kernel-server >/dev/null 2>&1 || {s}env DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -q nfs-kernel-server",
        f"{s}systemctl enable --now nfs-server",
        f"{s}exportfs -ra",
    ]


def worker_mount_commands(shared_dir: str, sudo: str = "") -> list[str]:
    """Mount the head's export on a worker (the fstab line is written first)."""
    s = f"{sudo} " if sudo else ""
    return [
        f"dpkg -s nfs-common >/dev/null 2>&1 || {s}env DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -q nfs-common",
        f"{s}mkdir -p {_q(shared_dir)}",
        f"mountpoint -q {_q(shared_dir)} || {s}mount {_q(shared_dir)}",
    ]


# ---------------------------------------------------------------------------------------------
# Script entry: `python3 - <command> --root R ...` prints one JSON line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fscache", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("add-fsc", "cachefilesd", "add-export", "add-mount", "revert"):
        sp = sub.add_parser(name)
        sp.add_argument("--root", default="/")
        if name in ("add-fsc", "add-export", "add-mount"):
            sp.add_argument("--shared-dir", required=True)
        if name == "cachefilesd":
            sp.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
        if name == "add-export":
            sp.add_argument("--client", action="append", required=True)
            sp.add_argument(
                "--no-root-squash", action="store_true", help="the SSH user is root: keep root"
            )
        if name == "add-mount":
            sp.add_argument("--server", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one edit and print its result as one JSON line; exit 2 when refused (nothing written)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        if args.command == "add-fsc":
            result = add_fsc(args.root, args.shared_dir)
        elif args.command == "cachefilesd":
            result = configure_cachefilesd(args.root, cache_dir=args.cache_dir)
        elif args.command == "add-export":
            options = DEFAULT_EXPORT_OPTIONS
            if args.no_root_squash:
                options = options.replace("root_squash", "no_root_squash")
            result = add_export(
                args.root, shared_dir=args.shared_dir, clients=args.client, options=options
            )
        elif args.command == "add-mount":
            result = add_mount(args.root, server=args.server, shared_dir=args.shared_dir)
        else:
            result = revert(args.root)
    except Refused as exc:
        print(json.dumps({"changed": False, "refused": str(exc)}))
        return EXIT_REFUSED
    print(json.dumps(result))
    return EXIT_OK


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
