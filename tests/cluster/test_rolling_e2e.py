"""`up --model NEW` on a running two-replica cluster: a rolling update under load, and a rollback.

The new model (a second hub repo) downloads while the old one serves; the replicas then switch
one at a time, and no request fails. A new model that cannot load is rolled back: `up` fails
saying so, and the old model kept serving the whole time; the rollback starts again only the
replica the failed update had stopped.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from cluster.demo_model import DEMO_MODEL_REPO_ID, build_demo_model
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e

NEW_REPO = "llamacluster/demo-tiny-llama-v2"


class Load:
    """Completions at concurrency ``workers`` against the endpoint until stopped, each worker
    waiting ``pause_s`` between its requests: every answer's time and status (0: no answer at
    all).

    The pause keeps a steady stream of users (several requests a second, so a gap in service
    still shows) without the back-to-back loop that held a core: on two cores that loop slowed
    every new engine's load, and with it the whole update, by minutes."""

    def __init__(
        self, url: str, key: str, model: str, workers: int = 1, pause_s: float = 0.2
    ) -> None:
        self.url, self.key, self.model, self.pause_s = url, key, model, pause_s
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(
                        f"{self.url}/v1/completions",
                        headers={"Authorization": f"Bearer {self.key}"},
                        json={"model": self.model, "prompt": "Hello there", "max_tokens": 4},
                    )
                    status, body = r.status_code, r.text[:200]
                except httpx.HTTPError as exc:
                    status, body = 0, f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.results.append((time.monotonic(), status, body))
                self._stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)

    def failures(self) -> list[tuple[float, int, str]]:
        with self._lock:
            return [r for r in self.results if r[1] != 200]

    def ok_count(self) -> int:
        with self._lock:
            return sum(1 for r in self.results if r[1] == 200)

    def longest_gap_s(self) -> float:
        """The longest time between two successful answers."""
        with self._lock:
            times = sorted(t for t, status, _ in self.results if status == 200)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _served_root(url: str, key: str) -> str:
    """The model directory behind the served name "demo", as /v1/models tells it."""
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return next(m["root"] for m in r.json()["data"] if m["id"] == "demo")


def _replica_pids(cli_env: dict) -> list[int]:
    """The process ids of the running replicas, as `status` lists them."""
    status = _ok(llamacluster("status", "--local", env=cli_env, timeout=300))
    return [int(p) for p in re.findall(r"replica \d on \S+ \(pid (\d+)\): RUNNING", status)]


@pytest.mark.timeout(1800)
def test_rolling_update_and_rollback_under_load(tmp_path, cli_env, hub_server):
    home = Path(cli_env["LLAMACLUSTER_HOME"])
    cli_env.update(hub_server.env())
    new = build_demo_model(tmp_path / "demo-v2", seed=1)
    hub_server.add_repo(NEW_REPO, new)
    broken = tmp_path / "broken-model"
    shutil.copytree(new, broken)
    # An architecture vLLM does not have: the engine fails as it starts, before it spawns
    # processes (a shard that cannot be parsed fails the same way half a minute later).
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    shared = tmp_path / "shared"
    common = ["--local", "--tp", "1", "--pp", "1", "--replicas", "2", "--served-model-name", "demo"]
    common += ["--cpu-slots", "2", "--cpu-kvcache-gb", "1", "--skip", "monitor"]
    common += ["--shared-dir", str(shared), "--restart-attempts", "1"]
    common += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0"]
    # The updates change only the model: the env, measure and Ray stages (checks that import
    # vLLM, slow on two cores busy with two engines and the load) have nothing to do.
    again = [*common, "--skip", "env", "--skip", "measure", "--skip", "ray"]
    try:
        _ok(llamacluster("up", "--model", DEMO_MODEL_REPO_ID, *common, env=cli_env, timeout=900))
        state = _state(home, "local")
        url = state["server"]["endpoint"]
        key = Path(state["secrets"]["api_key_file"]).read_text().strip()
        old_dir = state["server"]["deployed"]["model"]
        assert _served_root(url, key) == old_dir

        with Load(url, key, "demo") as load:
            time.sleep(3)
            t0 = time.monotonic()
            update = llamacluster("up", "--model", NEW_REPO, *again, env=cli_env, timeout=900)
            took = time.monotonic() - t0
            time.sleep(3)
        out = _ok(update)
        assert "rolling update" in out, out
        assert "fetched" in out, out  # the new model downloaded while the old one served
        assert load.failures() == [], load.failures()[:5]
        assert load.ok_count() > 20
        state = _state(home, "local")
        v2_dir = state["server"]["deployed"]["model"]
        assert v2_dir != old_dir
        assert _served_root(url, key) == v2_dir
        assert state["server"]["served_name"] == "demo"
        print(f"rolling update: {took:.1f} s, longest gap {load.longest_gap_s():.1f} s")
        before = _replica_pids(cli_env)
        assert len(before) == 2, before

        with Load(url, key, "demo") as load:
            time.sleep(2)
            t0 = time.monotonic()
            failed = llamacluster("up", "--model", str(broken), *again, env=cli_env, timeout=900)
            took = time.monotonic() - t0
            time.sleep(2)
        print(f"failed update and rollback: {took:.1f} s")
        assert failed.returncode != 0, failed.stdout[-3000:]
        said = failed.stdout + failed.stderr
        assert "rolled back" in said, said[-3000:]
        assert load.failures() == [], load.failures()[:5]
        assert load.ok_count() > 10
        # The model that serves is the one before the failed update (vLLM names its path).
        assert _served_root(url, key) == v2_dir
        # The rollback restarted only the replica the update had stopped: the other one kept
        # running the old config throughout.
        after = _replica_pids(cli_env)
        assert len(after) == 2 and len(set(after) & set(before)) == 1, (before, after)
    finally:
        _bring_down_and_check(home, "local", cli_env)
