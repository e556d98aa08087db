"""The benchmarks run in the environment of the plain `./bootstrap.sh`, which has no pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))
# What the benchmarks take from the test bed (the loopback hub, Ray nodes, server, netns nodes).
SUPPORT = ["hub", "netns", "ray_cluster", "server", "sshd", "stream_server"]
# Blocks `import pytest` in the child, as in an environment without the test tools.
NO_PYTEST = "import sys; sys.modules['pytest'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_PYTEST + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_really_blocks_pytest():
    assert _run("import pytest").returncode != 0


@pytest.mark.parametrize("module", [m for m in SUPPORT if m != "stream_server"])
def test_test_bed_parts_used_by_benchmarks_import_without_pytest(module):
    res = _run(f"import tests.support.{module}")
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_runs_its_help_without_pytest(script):
    res = _run(
        f"sys.argv = [{str(script)!r}, '--help']\nimport runpy\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()
    # Every test-bed module the script imports, anywhere in it, is one that imports without pytest.
    imported = {
        line.split("tests.support.", 1)[1].split()[0]
        for line in script.read_text(encoding="utf-8").splitlines()
        if "from tests.support." in line
    }
    assert imported <= set(SUPPORT) - {"stream_server"}, imported
