"""The README's first command, `llamacluster demo`, run whole as a person would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-c", "from cluster.cli.app import run; run()"]
# Free ports, so a developer's own Ray or server on the defaults does not collide; a short bench.
DEMO_ARGS = ["--api-port", "0", "--ray-port", "0", "--dashboard-port", "0", "--monitor-port", "0"]
DEMO_ARGS += ["--requests", "4", "--concurrency", "1,2", "--down"]


@pytest.mark.timeout(1200)
def test_demo_serves_chats_benches_and_cleans_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "COLUMNS": "200"}
    done = subprocess.run(
        [*CLI, "demo", *DEMO_ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-4000:]}\n{done.stderr[-4000:]}"
    # Every step of the main job ran, in order, and says what the model is.
    steps = [out.index(s) for s in ("1/3 up --local", "2/3 chat", "3/3 bench")]
    assert steps == sorted(steps)
    assert "gibberish" in out
    chat_line = next(line for line in out.splitlines() if "tokens, first after" in line)
    assert int(chat_line.split()[0]) > 0
    # The bench summary has both sweep points, each with all requests answered.
    for point in ("local c=1:", "local c=2:"):
        line = next(line for line in out.splitlines() if line.startswith(point))
        assert "(4/4 ok)" in line and float(line.split(":")[1].split()[0]) > 0
    # --down stopped what up started: no process of the cluster's Ray session is left.
    sessions = [int(s) for s in re.findall(r"ray started \(session (\d+)", out)]
    assert sessions, out
    ps = subprocess.run(["ps", "-eo", "sid=,stat="], capture_output=True, text=True).stdout
    alive = [ln for ln in ps.splitlines() if int(ln.split()[0]) in sessions and "Z" not in ln]
    assert not alive
