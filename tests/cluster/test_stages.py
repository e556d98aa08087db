"""Stage framework, dry-run plans, preflight helpers and tp × pp defaults, without a remote node."""

from __future__ import annotations

import io

import pytest

from cluster.errors import RemoteError
from cluster.inventory import local_cluster, parse_inventory
from cluster.lifecycle import UpConfig, up
from cluster.runner import LocalRunner
from cluster.stages.base import (
    Reporter,
    Stage,
    StageFailed,
    StageOutcome,
    UpContext,
    run_stages,
)
from cluster.stages.config import STAGE_NAMES
from cluster.stages.preflight import check_alike, node_state_from_probe, parse_probe, pick_address
from cluster.stages.serve import plan_parallelism
from cluster.state import Access, ClusterState, NodeState, Secrets, load_state


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def test_dry_run_prints_every_stage_per_node_and_runs_nothing(tmp_path, capsys):
    inv = tmp_path / "ips.txt"
    inv.write_text("root@127.0.0.2:2222\nroot@127.0.0.3:2222\n")
    cfg = UpConfig(
        inventory=inv,
        model="org/model",
        shared_dir=tmp_path / "shared",
        system_root=tmp_path / "root",
        tp=2,
        pp=2,
        dry_run=True,
    )
    state = up(cfg)
    out = capsys.readouterr().out
    for name in STAGE_NAMES:
        assert f"▸ {name}" in out
    assert "127.0.0.2:2222$" in out and "127.0.0.3:2222$" in out
    assert "python3 - add-fsc --root" in out  # cache stage in the temp-root mode
    assert "apt-get" not in out  # no system command in the temp-root mode
    assert "bin/python -m cluster.ray_start start --head" in out
    assert "--address 127.0.0.2:6379" in out
    # The port probe: a listener on each node, the worker tries the head's GCS port and both
    # of the head's listener ports, the head both of the worker's.
    assert "llamacluster-port-probe 127.0.0.2 20000 32000 1 " in out
    assert "llamacluster-port-probe 127.0.0.3 20000 32000 1 " in out
    assert "3.0 127.0.0.2:6379 '127.0.0.2:<its probe port>'" in out
    assert "3.0 '127.0.0.3:<its probe port>' '127.0.0.3:<its Ray worker-range port>'" in out
    assert not (tmp_path / "shared").exists()  # nothing ran
    assert state.nodes == []


def test_local_dry_run_skips_storage_and_cache(bare_model_dir, capsys):
    up(UpConfig(local=True, dry_run=True, model=str(bare_model_dir)))
    out = capsys.readouterr().out
    assert "skipped: one node: nothing to share" in out
    assert "skipped: --local" in out


def test_pick_address_and_interface():
    node = parse_inventory("root@127.0.0.2:2222").head
    addrs = ["lo 127.0.0.1/8", "eth0 192.0.2.2/24"]
    assert pick_address(node, addrs) == ("127.0.0.2", "lo")
    node = parse_inventory("gpu1 10.0.0.7").head
    assert pick_address(node, ["lo 127.0.0.1/8", "ens5 10.0.0.7/16"]) == ("10.0.0.7", "ens5")
    local = parse_inventory("127.0.0.1").head  # Ray would rewrite 127.0.0.1: use the real address
    assert pick_address(local, addrs) == ("192.0.2.2", "eth0")


def test_probe_parsing_gpu_nodes_and_mismatches():
    text = (
        "os=Ubuntu 22.04\npython=/usr/bin/python3\npython_version=3.10.12\nuid=1000\nsudo=yes\n"
        "numa=2\ngpu=NVIDIA H100 80GB HBM3, 81559, 550.54\ngpu=NVIDIA H100 80GB HBM3, 81559, 550.54\n"
        "cuda=12.4\naddr=ens5 10.0.0.7/16\ndisk_free_kb=104857600\n"
    )
    node = parse_inventory("ubuntu@10.0.0.7").head
    rec = node_state_from_probe(node, parse_probe(text), device="auto", cpu_slots=None)
    assert (rec.device_kind, rec.devices, rec.sudo) == ("gpu", 2, "sudo -n")
    assert rec.device_info["cuda"] == "12.4"
    cpu = node_state_from_probe(node, parse_probe(text), device="cpu", cpu_slots=None)
    assert (cpu.device_kind, cpu.devices) == ("cpu", 2)  # one slot per NUMA node
    other = rec.model_copy(
        update={"label": "b", "device_info": {**rec.device_info, "driver": "535.1"}}
    )
    assert check_alike([rec, rec.model_copy(update={"label": "a"})]) == []
    assert "driver differs" in check_alike([rec, other])[0]


LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}


def _gpu_nodes(count: int, per_node: int, mib: int) -> list[NodeState]:
    return [
        NodeState(
            name=f"n{i}",
            label=f"n{i}",
            host=f"h{i}",
            devices=per_node,
            device_kind="gpu",
            device_info={"memory_mib": str(mib)},
        )
        for i in range(count)
    ]


def test_tp_pp_defaults_come_from_the_planner(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    model = str(tmp_path)
    # 140 GB of weights: two 80 GB GPUs of one node hold it, so no pipeline stage crosses nodes
    # and the planner takes the smallest tp that fits (the other GPUs stay free).
    assert plan_parallelism(model, _gpu_nodes(2, 8, 81559)) == (2, 1)
    # 24 GiB GPUs, 4 per node: one node is not enough, so pp spans the two nodes.
    assert plan_parallelism(model, _gpu_nodes(2, 4, 24576), max_model_len=4096) == (4, 2)
    # A given tp is kept; both given are taken as they are.
    assert plan_parallelism(model, _gpu_nodes(2, 8, 81559), tp=8)[0] == 8
    assert plan_parallelism(model, _gpu_nodes(1, 1, 1024), tp=2, pp=2) == (2, 2)


class _Fails(Stage):
    name = "ray"
    title = "a stage that fails on a node"

    def plan(self, ctx):
        return {}

    def run(self, ctx):
        ctx.run("echo starting; echo 'port 6379 refused' >&2; exit 7", what="ray start")
        return StageOutcome("done", "never")


class _Done(Stage):
    name = "preflight"
    title = "a stage that is already done"

    def plan(self, ctx):
        return {}

    def run(self, ctx):
        return StageOutcome("unchanged", "as before")


def _context(config: UpConfig) -> UpContext:
    from rich.console import Console

    cluster = local_cluster()
    state = ClusterState(name="t", access=Access(local=True))
    return UpContext(
        config=config,
        cluster=cluster,
        state=state,
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(Console(file=io.StringIO())),
    )


def test_a_failing_stage_names_stage_node_and_next_step_and_is_recorded():
    ctx = _context(UpConfig(local=True))
    with pytest.raises(StageFailed) as caught:
        run_stages(ctx, [_Done(), _Fails()])
    assert isinstance(caught.value.__cause__, RemoteError)
    line = caught.value.one_line()
    assert "stage 'ray'" in line and "127.0.0.1 (exit 7)" in line and "port 6379 refused" in line
    assert "rerun the same `llamacluster up`" in line
    assert caught.value.exit_code == 4
    saved = load_state("t")
    assert saved.stages["preflight"].status == "unchanged"
    assert saved.stages["ray"].status == "failed"


class _Crashes(Stage):
    name = "serve"
    title = "a stage with a bug"

    def plan(self, ctx):
        return {}

    def run(self, ctx):
        return {}["missing"]


def test_a_stage_failing_with_any_exception_is_recorded_wrapped_and_logged(tmp_path):
    ctx = _context(UpConfig(local=True))
    log = ctx.reporter.open_log(tmp_path / "logs" / "run.log", secrets=["sk-lc-secretvalue"])
    ctx.reporter.info("key sk-lc-secretvalue must not reach the file")
    with pytest.raises(StageFailed) as caught:
        run_stages(ctx, [_Done(), _Crashes()])
    ctx.reporter.close_log()
    assert isinstance(caught.value.__cause__, KeyError)
    line = caught.value.one_line()
    assert line.startswith("up failed in stage 'serve': KeyError: 'missing'")
    assert f"full log: {log}" in line and caught.value.exit_code == 1
    assert load_state("t").stages["serve"].status == "failed"
    text = log.read_text()
    assert "== serve: a stage with a bug" in text and "FAILED" in text
    assert "sk-lc-secretvalue" not in text and "key *** must not" in text
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_skipped_stages_say_why():
    ctx = _context(UpConfig(local=True, skip=["preflight"]))
    results = run_stages(ctx, [_Done()])
    assert results["preflight"].status == "skipped"
    assert results["preflight"].message == "--skip preflight"


def test_tunnel_names_secret_files_and_prints_values_only_when_asked(tmp_path):
    from cluster.lifecycle import tunnel
    from cluster.state import Ports, cluster_dir, ensure_secret

    token, _ = ensure_secret(cluster_dir("gpus") / "ray_token")
    key, _ = ensure_secret(cluster_dir("gpus") / "api_key", prefix="sk-lc-")
    state = ClusterState(
        name="gpus",
        access=Access(
            inventory_text="ubuntu@203.0.113.10:2222 10.0.0.10\nubuntu@203.0.113.11 10.0.0.11\n"
        ),
        ports=Ports(ray_gcs=6379, dashboard=8265, api=8000),
        secrets=Secrets(ray_token=str(token), api_key_file=str(key)),
    )
    state.save()
    lines = tunnel("gpus")
    text = "\n".join(lines)
    assert lines[0].startswith("ssh ") and "-L 8000:127.0.0.1:8000" in lines[0]
    assert "-L 8265:127.0.0.1:8265" in lines[0] and lines[0].endswith("203.0.113.10")
    assert "-p 2222" in lines[0] and "-l ubuntu" in lines[0] and "ControlMaster" not in lines[0]
    assert str(token) in text and str(key) in text
    assert token.read_text().strip() not in text and key.read_text().strip() not in text
    shown = "\n".join(tunnel("gpus", show_secrets=True))
    assert token.read_text().strip() in shown and key.read_text().strip() in shown


def test_dry_run_nfs_from_the_head_plans_export_and_worker_mounts(tmp_path, capsys):
    inv = tmp_path / "ips.txt"
    inv.write_text("root@203.0.113.10 10.0.0.10\nroot@203.0.113.11 10.0.0.11\n")
    cfg = UpConfig(
        inventory=inv, model="org/model", shared_dir="/srv/llama", nfs_server="head", dry_run=True
    )
    up(cfg)
    out = capsys.readouterr().out
    head_lines = [ln for ln in out.splitlines() if ln.strip().startswith("203.0.113.10$")]
    worker_lines = [ln for ln in out.splitlines() if ln.strip().startswith("203.0.113.11$")]
    assert any(
        "add-export --root / --shared-dir /srv/llama --client 10.0.0.11" in ln for ln in head_lines
    )
    assert any("exportfs -ra" in ln for ln in head_lines)
    assert any(
        "add-mount --root / --server 10.0.0.10 --shared-dir /srv/llama" in ln for ln in worker_lines
    )
    assert any("apt-get install -y -q cachefilesd" in ln for ln in worker_lines)
    assert any("umount" in ln and "/proc/fs/nfsfs/volumes" in ln for ln in worker_lines)


def test_ready_failure_names_the_engines_root_cause_from_the_head_logs(tmp_path):
    import sys

    import cluster.stages.serve as serve_stage
    from cluster.errors import NotReadyError
    from cluster.state import Ports, RayNode
    from tests.support.status_server import status_server

    logs = tmp_path / "ray" / "session_latest" / "logs"
    logs.mkdir(parents=True)
    (logs / "worker-aa-01000000-7.err").write_text(
        ":actor_name:ServeReplica:llamacluster:LlamaclusterServer\n"
        "RuntimeError: open shm in SHMManager failed. errno: 2\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    # A server whose engine died: /ready and /health fail, so the real waiting program
    # (`python -m serve.remote wait`) gives up at once with the health check's reason.
    unhealthy = {"error": {"message": "engine failed to start"}}
    routes = {"/ready": (503, unhealthy), "/health": (503, unhealthy)}
    ctx = _context(UpConfig(local=True, ready_timeout_s=60))
    ctx.state.env.dir = sys.prefix
    ctx.state.nodes = [NodeState(name="head", label="127.0.0.1", host="127.0.0.1")]
    ctx.state.ray.nodes["head"] = RayNode(temp_dir=str(tmp_path / "ray"))
    with status_server(routes) as (url, seen), pytest.raises(NotReadyError) as caught:
        ctx.state.ports = Ports(api=int(url.rsplit(":", 1)[1]), ray_gcs=6379, dashboard=8265)
        serve_stage.Ready().run(ctx)
    assert seen == ["/ready", "/health"]  # one poll: it failed early, not at the timeout
    line = caught.value.one_line()
    assert f"server at {url} is not healthy: engine failed to start" in line
    assert "root cause in the head's logs: RuntimeError: open shm in SHMManager failed" in line


def test_redeploy_waits_for_the_old_servers_port_and_names_who_holds_it(monkeypatch):
    import socket
    import sys
    import threading

    import cluster.stages.serve as serve_stage

    monkeypatch.setattr(serve_stage, "PORT_RELEASE_WAIT_S", 1)
    ctx = _context(UpConfig(local=True))
    held = socket.create_server(("", 0))
    port = held.getsockname()[1]
    with pytest.raises(RemoteError) as caught:
        serve_stage.Serve._wait_port_released(ctx, sys.executable, port)
    assert f"port {port} on 127.0.0.1 is still taken" in caught.value.one_line()
    # Released while waiting: the wait ends and the port is free for the new server.
    monkeypatch.setattr(serve_stage, "PORT_RELEASE_WAIT_S", 20)
    threading.Timer(1.0, held.close).start()
    serve_stage.Serve._wait_port_released(ctx, sys.executable, port)
    socket.create_server(("", port)).close()


class _WritesForeignSection(Stage):
    name = "download"
    title = "a stage that writes the server's section"
    sections = ("download",)

    def plan(self, ctx):
        return {}

    def run(self, ctx):
        ctx.state.server.endpoint = "http://elsewhere:1"
        return StageOutcome("done", "wrote what is not its own")


def test_a_stage_writing_another_stages_section_is_refused():
    from cluster.stages.base import SectionOwnershipError

    ctx = _context(UpConfig(local=True))
    with pytest.raises(StageFailed) as caught:
        run_stages(ctx, [_WritesForeignSection()])
    assert isinstance(caught.value.__cause__, SectionOwnershipError)
    assert "stage 'download' wrote the state's server (owned by serve)" in str(caught.value)


def test_every_section_has_one_owning_stage_and_each_stage_owns_what_it_declares():
    from cluster.stages import STAGES
    from cluster.state import SECTION_OWNERS

    declared = {section: stage.name for stage in STAGES for section in stage.sections}
    for section, owner in declared.items():
        assert SECTION_OWNERS[section] == owner, section
    # Every section has its owner among the stages (monitoring: the monitor stage).
    assert set(SECTION_OWNERS) == set(declared)


def test_status_is_every_stages_check_and_down_every_stages_teardown(tmp_path, capsys):
    import sys

    from cluster.lifecycle import down, status
    from cluster.state import Access, EnvSection, ModelSection, StageResult

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ClusterState(
        name="t",
        access=Access(local=True),
        nodes=[NodeState(name="head", label="127.0.0.1", host="127.0.0.1")],
        env=EnvSection(dir=sys.prefix, versions={"head": {"vllm": "0.32.0", "ray": "2.60.0"}}),
        model=ModelSection(source=str(model), dir=str(model), served_names=["m"]),
        stages={"env": StageResult(status="done")},
    ).save()
    info = status("t")
    out = capsys.readouterr().out
    checks = info["checks"]
    assert list(checks) == list(STAGE_NAMES)
    assert checks["preflight"] == {"ok": True, "message": "1 node(s) reachable"}
    assert checks["env"]["ok"] is True and "vllm 0.32.0" in checks["env"]["message"]
    assert checks["download"] == {"ok": True, "message": f"{model} on every node"}
    assert checks["ray"]["ok"] is None and checks["serve"]["ok"] is None
    assert f"env:      ok {checks['env']['message']}" in out
    # The model's files gone: the download stage's check says so, and status shows it.
    (model / "config.json").unlink()
    assert status("t")["checks"]["download"]["ok"] is False
    assert "FAILED" in capsys.readouterr().out
    assert down("t") is not None and load_state("t").stages == {}
    assert down("t", purge=True) is None
    with pytest.raises(Exception, match="no cluster named 't'"):
        load_state("t")
