"""Held-out check of the planner's expected figures on a GPU: Llama-shaped models and points the
efficiency curve was not fitted to, measured with the calibration's own method
(cluster/planner/calibration/llama_step.py: random bf16 weights, CUDA-graph replay), against
`llamacluster plan`'s expected step time for the same shape on the same device.

    python3 devcheck/plan_holdout.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "cluster" / "planner" / "calibration"))

# Shapes the first calibration did not measure (their config values: CALIBRATION_MODELS), and
# points it did not: decode (batch, context) and prefill tokens.
HOLDOUT = {
    "llama-3.2-3b-shape": ([(1, 512), (16, 1024), (64, 2048)], [1024]),
    "qwen2.5-14b-shape": ([(1, 512), (32, 1024)], [512]),
    "llama-3.1-8b": ([(64, 2048)], [4096]),
}


def config_of(name: str) -> dict:
    """The model's config.json values, as the planner reads them."""
    from cluster.planner.calibration import _LLAMA_BASE, CALIBRATION_MODELS

    return {**_LLAMA_BASE, **CALIBRATION_MODELS[name]}


def measure(out: Path) -> dict:
    import llama_step
    import torch

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    started = time.time()
    res["copy_tb_s"] = llama_step.copy_tb_s("cuda")
    for name, (decodes, prefills) in HOLDOUT.items():
        v = config_of(name)
        llama_step.SHAPES[name] = (
            v["hidden_size"],
            v["intermediate_size"],
            v["num_hidden_layers"],
            v["num_attention_heads"],
            v["num_key_value_heads"],
            v["hidden_size"] // v["num_attention_heads"],
            v["vocab_size"],
        )
        llama_step.run_plan(res, name, v["num_hidden_layers"], decodes, prefills, "cuda")
        torch.cuda.empty_cache()
    res["seconds"] = time.time() - started
    out.write_text(json.dumps(res, indent=1))
    return res


def compare(res: dict) -> list[dict]:
    from cluster.device_specs import get_device
    from cluster.planner import ClusterShape, PlanOptions, plan_deployment
    from cluster.planner.calibration import calibration_shape

    h200 = get_device("h200")
    table = []
    for row in res["rows"]:
        shape = calibration_shape(row["model"])
        decode = row["kind"] == "decode"
        options = PlanOptions(
            prompt_len=row["ctx"] if decode else row["tokens"],
            concurrency=row["batch"] if decode else 1,
            max_model_len=8192,
            mem_fraction=1.0,
        )
        perf = plan_deployment(shape, ClusterShape(device=h200), options).performance
        step = perf.expected.decode_at_concurrency if decode else perf.expected.prefill
        label = (
            f"{row['model']} decode b{row['batch']} ctx{row['ctx']}"
            if decode
            else f"{row['model']} prefill {row['tokens']}"
        )
        table.append(
            {
                "row": label,
                "measured_ms": row["ms_full_model"],
                "expected_ms": step.total_ms,
                "expected_over_measured": step.total_ms / row["ms_full_model"],
            }
        )
        print(
            f"{label:45} measured {row['ms_full_model']:8.3f} ms  expected "
            f"{step.total_ms:8.3f} ms  ratio {step.total_ms / row['ms_full_model']:.3f}"
        )
    return table


if __name__ == "__main__":
    target = Path(sys.argv[1])
    compare(measure(target))
