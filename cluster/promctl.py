"""Ask a Prometheus on this host whether it is ours, ready, and scraping: standard library only.

The monitor stage ships this file to the head on stdin and runs it with the system python3
(``python3 - probe --url http://127.0.0.1:9090 --config DIR/prometheus.yml ...``), like
cluster/fscache.py. It prints one JSON line and exits 0 when everything asked for holds:

- the server at ``--url`` answers ``/-/ready`` with 200;
- it is *our* Prometheus: its ``config.file`` flag is ``--config`` (another Prometheus on the
  same port, the system's for example, never passes for ours);
- with ``--pid``: that process is alive (a Prometheus that exited is reported at once, with the
  last lines of ``--log``);
- every ``--need-job`` has at least one target whose health is ``up``.

``--wait-s`` keeps asking (every half second) until all of that holds or the time is up; 0
asks once. The reply: ``{"ok", "ready", "ours", "targets": [{"job", "instance", "health",
"error"}], "error"}``; exit 1 when not ok.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def _get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return 0, str(exc).encode()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: str | None, lines: int = 5) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return " | ".join(x.strip() for x in fh.read().splitlines()[-lines:] if x.strip())
    except OSError:
        return ""


def observe(url: str, config: str) -> dict:
    """One look at the Prometheus at ``url``: ready? ours? its targets."""
    seen: dict = {"ready": False, "ours": False, "targets": [], "error": ""}
    status, _ = _get(f"{url}/-/ready")
    seen["ready"] = status == 200
    if not seen["ready"]:
        seen["error"] = f"/-/ready answered {status or 'nothing'}"
        return seen
    status, body = _get(f"{url}/api/v1/status/flags")
    try:
        flags = json.loads(body)["data"] if status == 200 else {}
    except (ValueError, KeyError, TypeError):
        flags = {}
    seen["ours"] = flags.get("config.file") == config
    if not seen["ours"]:
        seen["error"] = (
            f"the Prometheus at {url} is not this cluster's (config {flags.get('config.file')!r})"
        )
        return seen
    status, body = _get(f"{url}/api/v1/targets?state=active")
    try:
        active = json.loads(body)["data"]["activeTargets"] if status == 200 else []
    except (ValueError, KeyError, TypeError):
        active = []
    seen["targets"] = [
        {
            "job": t.get("scrapePool") or t.get("labels", {}).get("job", ""),
            "instance": t.get("labels", {}).get("instance", ""),
            "health": t.get("health", "unknown"),
            "error": (t.get("lastError") or "")[:200],
        }
        for t in active
    ]
    return seen


def probe(args: argparse.Namespace) -> tuple[bool, dict]:
    """Ask until everything holds or ``--wait-s`` has passed; (ok, what was seen last)."""
    deadline = time.monotonic() + args.wait_s
    while True:
        if args.pid and not _alive(args.pid):
            return False, {
                "ready": False,
                "ours": False,
                "targets": [],
                "error": f"prometheus (pid {args.pid}) exited: {_tail(args.log) or 'no output'}",
            }
        seen = observe(args.url, args.config)
        missing = [
            job
            for job in args.need_job
            if not any(t["job"] == job and t["health"] == "up" for t in seen["targets"])
        ]
        if seen["ready"] and seen["ours"] and not missing:
            return True, seen
        if missing and seen["ours"]:
            seen["error"] = "no target up yet for job(s) " + ", ".join(missing)
        if time.monotonic() >= deadline:
            return False, seen
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promctl")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--url", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--log")
    p.add_argument("--need-job", action="append", default=[])
    p.add_argument("--wait-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    ok, seen = probe(args)
    seen["ok"] = ok
    print(json.dumps(seen, sort_keys=True))
    if not ok:
        print(seen.get("error") or "not ready", file=sys.stderr)
    return 0 if ok else 1


def script_command(*args: str, python: str = "python3") -> str:
    """The shell command that runs this module on a node (its source goes on stdin)."""
    from cluster.stdin_program import stdin_command

    return stdin_command(*args, python=python)


def script_source() -> str:
    """This module's source, to send on stdin with ``script_command``."""
    from cluster.stdin_program import source_of

    return source_of(__file__)


if __name__ == "__main__":
    sys.exit(main())
