"""`up`'s inputs: flags from the config model, errors naming real flags, the model and its
served names resolved before any stage runs, stages and their names, old state files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from cluster.bench.config import BenchConfig, LoadConfig, WorkloadConfig
from cluster.cli.app import app
from cluster.errors import ConfigError, flag_of, validation_error
from cluster.lifecycle import UpConfig, up
from cluster.stages import STAGES
from cluster.stages.config import STAGE_NAMES
from cluster.stages.serve import served_names
from cluster.state import load_state
from serve.config import ServeConfig

CLI = [sys.executable, "-c", "from cluster.cli.app import run; run()"]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _flags(command: str) -> set[str]:
    """Every option string of a CLI command, hidden ones included."""
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize(
    ("command", "model", "internal"),
    [
        ("up", UpConfig, set()),
        # Set by serve.models.endpoint_configs from a repeated --model.
        ("serve", ServeConfig, {"route_prefix", "endpoint_apps"}),
        ("bench", BenchConfig, {"workload", "load"}),  # nested: their fields are the flags
        ("bench", WorkloadConfig, {"extra_body", "ignore_eos"}),  # set by --api/--force-output-len
        ("bench", LoadConfig, set()),
    ],
)
def test_every_field_names_a_real_flag(command, model, internal):
    flags = _flags(command)
    for field in model.model_fields:
        if field in internal:
            continue
        for flag in flag_of(model, field).split("/"):
            assert flag in flags, f"{model.__name__}.{field} names {flag}, not a flag of {command}"


def test_a_validation_error_names_the_flag_a_person_typed():
    with pytest.raises(Exception) as caught:
        UpConfig(local=True, max_model_len=8, identity_file=None, ready_timeout_s=-1)
    line = validation_error(caught.value, UpConfig).one_line()
    assert "--max-model-len: Input should be greater than or equal to 16" in line
    assert "--ready-timeout: Input should be greater than 0" in line
    assert "max_model_len" not in line and "\n" not in line


def test_cli_refuses_a_bad_value_with_the_flag_and_exit_3(tmp_path):
    env = {"LLAMACLUSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [*CLI, "up", "--local", "--max-model-len", "8", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 3
    assert done.stderr.strip() == (
        "error: --max-model-len: Input should be greater than or equal to 16"
    )


def test_vllm_spellings_and_engine_args_reach_the_config(tmp_path, capsys):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    done = subprocess.run(
        [
            *CLI,
            "up",
            "--local",
            "--model",
            str(model),
            "--dry-run",
            "-tp",
            "2",
            "--pipeline-parallel-size",
            "1",
            "--engine-arg",
            "max_num_seqs=8",
        ],
        capture_output=True,
        text=True,
        env={"LLAMACLUSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    deploy = next(line for line in done.stdout.splitlines() if "serve.remote deploy" in line)
    request = json.loads(deploy.split("stdin: ", 1)[1])
    assert request["config"]["model"] == str(model)
    assert (request["config"]["tp"], request["config"]["pp"]) == (2, 1)


def test_every_up_flag_spelling_lands_in_the_config(monkeypatch):
    import cluster.lifecycle
    from cluster.cli.app import main

    seen: list[UpConfig] = []
    monkeypatch.setattr(cluster.lifecycle, "up", lambda config: seen.append(config))
    argv = [
        "up", "--local", "--tensor-parallel-size", "2", "-pp", "2", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.5", "--served-model-name", "a", "--served-model-name", "b",
        "--engine-arg", "enable_prefix_caching=true", "--engine-arg", "max-num-seqs=8",
        "--cache-dir", "/var/cache/x", "--ssh-key", "/k", "--ready-timeout", "60",
    ]  # fmt: skip
    assert main(argv) == 0
    (config,) = seen
    assert (config.tp, config.pp, config.max_model_len) == (2, 2, 256)
    assert config.gpu_memory_utilization == 0.5 and config.served_model_name == ["a", "b"]
    assert config.engine_args == {"enable_prefix_caching": True, "max_num_seqs": 8}
    assert (config.cache_dir, str(config.identity_file)) == ("/var/cache/x", "/k")
    assert config.ready_timeout_s == 60


def test_served_name_is_the_repo_id_for_a_hub_model_and_the_dir_name_for_a_directory(tmp_path):
    assert served_names([], "acc/tiny") == ["acc/tiny"]
    model = tmp_path / "acc--tiny"
    model.mkdir()
    assert served_names([], str(model)) == ["acc--tiny"]
    assert served_names(["a", "b", "a"], "acc/tiny") == ["a", "b"]


def test_model_dir_is_known_before_the_stages_run_even_with_skip_download(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for model in (first, second):
        model.mkdir()
        (model / "config.json").write_text("{}")
    state = up(UpConfig(local=True, dry_run=True, model=str(first), skip=["download"]))
    assert (state.model.dir, state.model.served_names) == (str(first), ["first"])
    state = up(UpConfig(local=True, dry_run=True, model=str(second), skip=["download"]))
    assert (state.model.dir, state.model.repo_id) == (str(second), None)
    hub = up(UpConfig(local=True, dry_run=True, model="org/name", shared_dir=tmp_path / "s"))
    assert hub.model.dir == f"{tmp_path / 's'}/models/org--name"
    assert (hub.model.repo_id, hub.model.served_names) == ("org/name", ["org/name"])


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "is not a directory"),
        (lambda p: p.mkdir(), "has no config.json"),
    ],
)
def test_a_local_model_that_is_no_model_stops_up_before_any_stage(tmp_path, make, said):
    model = tmp_path / "m"
    make(model)
    env = {"LLAMACLUSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    for args in (["--model", str(model)], ["--model", "org/a", "--model", f"{model},tp=1"]):
        done = subprocess.run(
            [*CLI, "up", "--local", *args], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 3, done.stderr
        assert said in done.stderr and str(model) in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        # Nothing ran: no state, no stage output.
        assert not (tmp_path / "home" / "clusters").exists()
        assert "stage" not in done.stdout.lower()


def test_the_stage_list_and_the_stage_names_agree():
    assert [s.name for s in STAGES] == list(STAGE_NAMES)
    assert len({s.title for s in STAGES}) == len(STAGES)


# A state file as the first format wrote it (flat fields, Ray records inside the nodes).
V1_STATE = {
    "name": "old", "local": False, "inventory_path": "/p/ips.txt",
    "inventory_text": "root@203.0.113.5\n", "ssh_user": None, "ssh_port": None,
    "identity_file": "/k", "known_hosts": None,
    "nodes": [{
        "name": "head", "label": "203.0.113.5", "host": "203.0.113.5", "private_ip": "10.1.0.5",
        "devices": 8, "device_kind": "gpu", "device_info": {"gpu": "H100"},
        "ray_temp_dir": "/tmp/lc-ab", "ray_session": 4242, "ray_ports": {"node_manager": 20001},
        "token_path": "/root/.llamacluster/nodes/old-ab/ray_token",
        "versions": {"python": "3.11.7", "vllm": "0.32.0", "ray": "2.60.0"},
    }],
    "ports": {"ray_gcs": 6379, "dashboard": 8265, "api": 8000},
    "shared_dir": "/mnt/shared", "env_dir": "/mnt/shared/env", "model": "org/m",
    "model_dir": "/mnt/shared/models/org--m", "served_model_name": "org--m", "tp": 8, "pp": 1,
    "endpoint": "http://10.1.0.5:8000", "token_path": "/c/ray_token", "api_key_file": "/c/api_key",
    "remote_token_path": "/root/.llamacluster/nodes/old-ab/ray_token",
    "remote_api_key_file": "/root/.llamacluster/nodes/old-ab/api_key",
    "config_hash": "x", "serve_config_hash": "y", "system_root": "/",
    "fs_edits": {"head": ["/etc/fstab"]}, "stages": {}, "created_at": 1.0, "updated_at": 2.0,
}  # fmt: skip


def test_a_state_file_of_the_previous_format_loads_and_a_broken_one_fails_clearly(tmp_path):
    path = tmp_path / "home" / "clusters" / "old" / "state.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(V1_STATE))
    s = load_state("old")
    assert s.format == 2 and not s.local and s.access.identity_file == "/k"
    assert s.ray.node("head").session == 4242 and s.ray.node("head").temp_dir == "/tmp/lc-ab"
    assert s.ray.node("head").ports == {"node_manager": 20001}
    assert s.ray.head_token_path == V1_STATE["remote_token_path"]
    assert s.env.dir == "/mnt/shared/env" and s.env.versions["head"]["vllm"] == "0.32.0"
    assert s.nodes[0].versions == {"python": "3.11.7"}
    assert (s.model.repo_id, s.model.dir) == ("org/m", "/mnt/shared/models/org--m")
    assert (s.server.endpoint, s.server.tp, s.server.config_digest) == (
        "http://10.1.0.5:8000",
        8,
        "y",
    )
    assert (s.secrets.ray_token, s.secrets.api_key_file) == ("/c/ray_token", "/c/api_key")
    assert s.cache.fs_edits == {"head": ["/etc/fstab"]}
    s.save()  # written back in the new layout, and read again unchanged
    assert json.loads(path.read_text())["format"] == 2
    assert load_state("old").model_dump(exclude={"updated_at"}) == s.model_dump(
        exclude={"updated_at"}
    )
    path.write_text(json.dumps({**V1_STATE, "nodes": "not a list"}))
    with pytest.raises(ConfigError) as caught:
        load_state("old")
    line = caught.value.one_line()
    assert str(path) in line and "unreadable" in line and "remove that file" in line
    path.write_text(json.dumps({"format": 99, "name": "old"}))
    with pytest.raises(ConfigError, match="format 99, newer"):
        load_state("old")


def test_strict_host_keys_is_recorded_by_up(tmp_path):
    inv = tmp_path / "ips.txt"
    inv.write_text("root@127.0.0.2:2222\n")
    state = up(UpConfig(inventory=inv, model="org/m", shared_dir=tmp_path, dry_run=True))
    assert state.access.strict_host_keys is False
    strict = UpConfig(
        inventory=inv, model="org/m", shared_dir=tmp_path, dry_run=True, strict_host_keys=True
    )
    assert up(strict).access.strict_host_keys is True


def test_server_settings_of_up_are_the_servers_own_fields():
    from cluster.stages.config import SERVER_FIELDS

    for name in (*SERVER_FIELDS, "admin_key_file"):
        ours, theirs = UpConfig.model_fields[name], ServeConfig.model_fields[name]
        assert (ours.default, ours.description, ours.metadata) == (
            theirs.default,
            theirs.description,
            theirs.metadata,
        ), name
        assert flag_of(UpConfig, name) == flag_of(ServeConfig, name)
    # A changed limit is a changed server: it redeploys the server alone.
    base = UpConfig(local=True).serve_fields()
    changed = UpConfig(local=True, max_n=2, allowed_media_domains=["img.example"]).serve_fields()
    assert {k for k in base if base[k] != changed[k]} == {"max_n", "allowed_media_domains"}


def test_up_refuses_an_admin_key_file_others_can_read(tmp_path):
    keys = tmp_path / "admin"
    keys.write_text("admin-secret-0001\n")
    keys.chmod(0o644)
    done = subprocess.run(
        [*CLI, "up", "--local", "--dry-run", "--admin-key-file", str(keys)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--admin-key-file" in done.stderr and "chmod 600" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_first_model_takes_options_like_the_others() -> None:
    from cluster.cli.cluster_cmd import _first_model

    got = _first_model(
        ["org/a,tp=4,name=big,lora=x=/l/x", "org/b,name=b"], [], [], None, None, "auto", None
    )
    assert got == (["org/a", "org/b,name=b"], ["big"], ["x=/l/x"], 4, None, "auto", None)
    plain = _first_model(["org/a"], ["n"], [], 2, 1, "3", 512)
    assert plain == (["org/a"], ["n"], [], 2, 1, "3", 512)
    with pytest.raises(ConfigError, match="sets tp and --tp is given too"):
        _first_model(["org/a,tp=4"], [], [], 2, None, "auto", None)
    with pytest.raises(ConfigError, match="sets replicas and --replicas"):
        _first_model(["org/a,replicas=2"], [], [], None, None, "3", None)
