"""Several models on one cluster: share_devices' arithmetic and `plan --model A --model B ...`."""

from __future__ import annotations

import json

import pytest

from cluster.errors import ConfigError
from cluster.planner import (
    ClusterShape,
    ModelLayout,
    PlanOptions,
    choose_replicas,
    explicit_replicas,
    load_model_shape,
    plan_deployment,
    share_devices,
)
from tests.cluster.test_planner import (
    H100,
    LLAMA3_70B,
    LLAMA_7B,
    MIXTRAL_8X7B,
    QWEN25_05B,
    run_cli,
    write_model_dir,
)

# --- share_devices: the rule `up`'s serve stage follows ------------------------------------


def test_auto_replicas_of_the_first_model_fill_what_is_left():
    first = choose_replicas([8, 8], tp=2, pp=1)
    assert first.replicas == 8
    shared = share_devices(
        first,
        [ModelLayout(name="b", tp=1, pp=1, replicas=2), ModelLayout(name="c", tp=1, pp=1)],
        first_name="a",
    )
    # b takes 2, c takes 1 (one unless asked): 13 left, 6 groups of tp=2.
    assert [(m.name, m.replicas, m.devices) for m in shared.models] == [
        ("a", 6, 12),
        ("b", 2, 2),
        ("c", 1, 1),
    ]
    assert shared.first.replicas == 6 and shared.first.auto
    assert "6 beside the further models' 3 device(s)" in shared.first.why
    assert (shared.devices, shared.devices_used, shared.idle_devices) == (16, 15, 1)
    assert shared.fits
    assert shared.line == (
        "3 models fit: 15 of 16 devices, 1 idle (a: 6 replicas of tp=2 × pp=1; "
        "b: 2 replicas of tp=1 × pp=1; c: tp=1 × pp=1)"
    )
    shared.check()  # fits: no error


def test_auto_replicas_never_drop_below_one():
    first = choose_replicas([4], tp=2, pp=1)
    shared = share_devices(first, [ModelLayout(name="b", tp=2, pp=1, replicas=2)], first_name="a")
    # b takes all 4 devices; the first model still gets one replica, and that does not fit.
    assert shared.first.replicas == 1
    assert (shared.devices_used, shared.fits, shared.idle_devices) == (6, False, 0)
    with pytest.raises(ConfigError, match="needs 6 devices, the cluster has 4") as info:
        shared.check()
    assert "fewer models" in (info.value.hint or "")


def test_asked_replicas_are_kept_even_when_they_do_not_fit():
    first = explicit_replicas(3, tp=1, pp=2, devices=8)
    shared = share_devices(first, [ModelLayout(name="b", tp=2, pp=2)], first_name="a")
    assert [m.devices for m in shared.models] == [6, 4]
    assert shared.first.replicas == 3 and not shared.fits
    assert shared.line.endswith("needs 10 devices, the cluster has 8: does not fit")


def test_auto_count_lower_than_what_is_left_is_kept():
    # The first model's own count (capped by its layout) is already below what is left.
    first = choose_replicas([8], tp=1, pp=1, limit=3)
    shared = share_devices(first, [ModelLayout(name="b", tp=1, pp=1)], first_name="a")
    assert shared.first.replicas == 3 and shared.first.why == first.why
    assert (shared.devices_used, shared.idle_devices) == (4, 4)


def test_one_model_alone_is_its_own_choice():
    first = choose_replicas([8, 8], tp=8, pp=1)
    shared = share_devices(first, [], first_name="a")
    assert shared.first == first and [m.devices for m in shared.models] == [16]
    assert shared.line == "1 model fits: 16 of 16 devices (a: 2 replicas of tp=8 × pp=1)"


# --- `plan` with several --model values ---------------------------------------------------


@pytest.fixture
def models(tmp_path):
    """Model directories with the published configs (config.json only: plan reads no weights)."""
    return {
        name: write_model_dir(tmp_path, config, name)
        for name, config in (
            ("llama3-70b", LLAMA3_70B),
            ("llama-7b", LLAMA_7B),
            ("qwen2.5-0.5b", QWEN25_05B),
            ("mixtral-8x7b", MIXTRAL_8X7B),
        )
    }


CLUSTER = ["--gpus-per-node", "8", "--nodes", "2"]


def test_two_models_fit_and_the_first_fills_the_rest(models, capsys):
    args = ["plan", "--model", str(models["llama3-70b"]), "--model",
            f"{models['llama-7b']},name=small,replicas=2", *CLUSTER]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    # Each model's tables, titled by the model, then the joint table.
    assert out.index("llama3-70b ─") < out.index("Model ") < out.index("small ─")
    assert "Together: 2 models on 16 x NVIDIA H100 SXM5 80GB (2 node(s) of 8)" in out
    # 70B is tp=2 on an H100; the 7B takes 2 devices: 14 left, 7 replicas of the 70B.
    assert "replicas: 7 of tp=2 × pp=1" in out and "7 (auto)" in out
    assert (
        "2 models fit: 16 of 16 devices (llama3-70b: 7 replicas of tp=2 × pp=1; "
        "small: 2 replicas of tp=1 × pp=1)" in out
    )

    code, out, _ = run_cli([*args, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"plans", "together"} and len(data["plans"]) == 2
    first, second = data["plans"]
    assert (first["tp"], first["replicas"]["replicas"], first["replicas"]["auto"]) == (2, 7, True)
    assert (second["tp"], second["replicas"]["replicas"], second["replicas"]["auto"]) == (
        1,
        2,
        False,
    )
    together = data["together"]
    assert [
        (m["name"], m["tp"], m["pp"], m["replicas"], m["devices"]) for m in together["models"]
    ] == [
        ("llama3-70b", 2, 1, 7, 14),
        ("small", 1, 1, 2, 2),
    ]
    assert (together["devices"], together["devices_used"], together["fits"]) == (16, 16, True)
    assert together["first"]["replicas"] == 7 and together["line"].startswith("2 models fit")


def test_each_model_has_its_own_tp_and_max_model_len(models, capsys):
    code, out, _ = run_cli(
        ["plan", "--model", f"{models['llama-7b']},tp=2,max-model-len=1024", "--model",
         f"{models['qwen2.5-0.5b']},max-model-len=4096,lora=sql=/nowhere", *CLUSTER, "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    first, second = json.loads(out)["plans"]
    assert (first["tp"], first["max_model_len"]) == (2, 1024)
    assert (second["tp"], second["max_model_len"]) == (1, 4096)


def test_three_models_that_do_not_fit_print_everything_and_exit_3(models, capsys):
    args = ["plan", "--model", f"{models['llama3-70b']},replicas=4", "--model",
            f"{models['llama-7b']},tp=2,replicas=3", "--model",
            f"{models['mixtral-8x7b']},replicas=2", *CLUSTER]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 3
    assert out.count("Model ") == 3 and "18 of 16" in out and "does not fit" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(
        "error: llama3-70b: 4 replicas of tp=2 × pp=1; llama-7b: 3 replicas of tp=2 × pp=1; "
        "mixtral-8x7b: 2 replicas of tp=2 × pp=1 needs 18 devices, the cluster has 16 ("
    )
    assert "plan fewer models" in lines[0] and "--nodes" in lines[0]

    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 3 and "needs 18 devices" in err
    together = json.loads(out)["together"]
    assert (together["devices_used"], together["fits"]) == (18, False)

    # One node more and they fit.
    code, _, _ = run_cli([*args[:-1], "3"], capsys)
    assert code == 0


def test_a_model_too_big_alone_is_named(models, capsys):
    code, out, err = run_cli(
        ["plan", "--model", str(models["llama-7b"]), "--model",
         f"{models['llama3-70b']},tp=1,pp=1", "--gpus-per-node", "8"],
        capsys,
    )  # fmt: skip
    assert code == 3 and out == ""
    assert err.startswith("error: llama3-70b: ") and len(err.strip().splitlines()) == 1


def test_bad_specs_are_one_line(models, capsys):
    path = str(models["llama-7b"])
    for args, message in (
        ([f"{path},bogus=1", "--model", path], "is not an option of a model"),
        ([f"{path},tp=2", "--model", path, "--tp", "2"], "--tp is given too"),
        ([path, "--model", f"{path},replicas=0"], "replicas=0 is not a size"),
    ):
        code, out, err = run_cli(["plan", "--model", *args], capsys)
        assert code == 3 and message in err and out == ""


# --- one model: the output of before ------------------------------------------------------


def test_one_model_json_is_the_plan_itself(models, capsys):
    path = models["mixtral-8x7b"]
    code, out, _ = run_cli(
        ["plan", "--model", str(path), "--gpus-per-node", "4", "--max-model-len", "4096",
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    cluster = ClusterShape(nodes=1, devices_per_node=4, device=H100)
    plan = plan_deployment(load_model_shape(str(path)), cluster, PlanOptions(max_model_len=4096))
    assert json.loads(out) == plan.model_dump(mode="json")

    # The same model written with its own options plans the same.
    code, same, _ = run_cli(
        ["plan", "--model", f"{path},max-model-len=4096", "--gpus-per-node", "4", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0 and json.loads(same) == json.loads(out)


def test_one_model_table_has_no_joint_part(models, capsys):
    code, out, _ = run_cli(["plan", "--model", str(models["mixtral-8x7b"]), *CLUSTER], capsys)
    assert code == 0
    assert out.startswith("Model ") and "Together" not in out and " ─" not in out


def test_one_model_with_replicas_that_do_not_fit(models, capsys):
    code, out, err = run_cli(
        ["plan", "--model", f"{models['llama3-70b']},replicas=5", "--gpus-per-node", "8"], capsys
    )
    assert code == 3 and "replicas: 5 of tp=2 × pp=1 (replicas=5 of its --model)" in out
    assert "needs 10 devices, the cluster has 8" in err
