"""Deployment sizing from a model's config.json: parameters, memory, tp x pp, speed and cost bounds.

The package, leaves first (each module imports only those above it):

- ``dtypes``: dtype names and byte sizes, GiB.
- ``shape``: ModelShape (with its MoE and latent-attention parts) parsed from config.json.
- ``loader``: config.json from a local directory or the Hugging Face hub.
- ``params``: parameter counts (total, active, per tensor-parallel rank).
- ``memory``: weight and KV-cache bytes, the dtypes a plan uses, runtime headroom.
- ``engine_options``: vLLM's --quantization, --speculative-config (draft memory), KV offload.
- ``options``: the cluster (ClusterShape) and the knobs of a plan (PlanOptions).
- ``stages``: pipeline stages of a layout and the memory of one device of a stage.
- ``layout``: the tp x pp search (choose_parallelism).
- ``efficiency``: fitted efficiency curves per device family; which efficiency a plan uses.
- ``speed``: step time (bytes and FLOPs per stage at given efficiencies) and communication.
- ``calibration``: measured step times and the fit of the efficiency curves to them.
- ``replicas``: how many tp x pp replicas the devices hold (``--replicas auto``).
- ``together``: several models on one cluster (share_devices: each one's devices, the fit).
- ``plan``: Plan and plan_deployment, which puts it all together.

`llamacluster plan` renders the Plan (cluster/cli/plan_cmd.py); `up` calls choose_parallelism,
choose_replicas and share_devices.
"""

from cluster.planner.dtypes import (
    GIB,
    INT4_GROUP_SIZE,
    INT4_SCALE_OVERHEAD_BYTES,
    KV_DTYPE_BYTES,
    QUANTIZED_DTYPES,
    WEIGHT_DTYPE_BYTES,
    normalize_dtype,
)
from cluster.planner.efficiency import CURVES, EfficiencyCurve, StepEfficiency, expected_efficiency
from cluster.planner.engine_options import (
    DraftCost,
    draft_cost,
    parse_speculative_config,
    quantization_weight_dtype,
)
from cluster.planner.layout import choose_parallelism, tp_violation
from cluster.planner.loader import load_model_config, load_model_shape
from cluster.planner.memory import (
    ACTIVATION_TOKENS_LARGE,
    ACTIVATION_TOKENS_SMALL,
    LARGE_DEVICE_GIB,
    LOGITS_SEQS,
    RUNTIME_OVERHEAD_GIB,
    kv_bytes_per_token,
    kv_bytes_per_token_per_layer,
    resolve_kv_dtype,
    resolve_weight_dtype,
    runtime_headroom_bytes,
    weight_bytes,
)
from cluster.planner.options import ClusterShape, PlanOptions
from cluster.planner.params import (
    ParamCount,
    attention_params_per_device,
    count_parameters,
    dense_mlp_params,
    expert_params,
    shared_expert_params,
)
from cluster.planner.plan import (
    Cost,
    Figures,
    KVOffload,
    ModelSummary,
    Performance,
    Plan,
    plan_deployment,
)
from cluster.planner.replicas import (
    MAX_REPLICAS,
    ReplicaChoice,
    choose_replicas,
    cpu_memory_slots,
    explicit_replicas,
    host_slot_limit,
    worker_memory_gib,
)
from cluster.planner.shape import MLAShape, ModelShape, MoEShape, parse_model_shape
from cluster.planner.speed import (
    PP_TENSORS_PER_HOP,
    TP_ALLREDUCES_PER_LAYER,
    Communication,
    StepTime,
    communication,
    experts_touched,
)
from cluster.planner.stages import StageMemory, pipeline_stage_layers
from cluster.planner.together import (
    FIT_HINT,
    ModelDevices,
    ModelLayout,
    SharedDevices,
    share_devices,
)

__all__ = [
    "ACTIVATION_TOKENS_LARGE",
    "ACTIVATION_TOKENS_SMALL",
    "CURVES",
    "FIT_HINT",
    "GIB",
    "INT4_GROUP_SIZE",
    "INT4_SCALE_OVERHEAD_BYTES",
    "KV_DTYPE_BYTES",
    "LARGE_DEVICE_GIB",
    "LOGITS_SEQS",
    "MAX_REPLICAS",
    "PP_TENSORS_PER_HOP",
    "QUANTIZED_DTYPES",
    "RUNTIME_OVERHEAD_GIB",
    "TP_ALLREDUCES_PER_LAYER",
    "WEIGHT_DTYPE_BYTES",
    "ClusterShape",
    "Communication",
    "Cost",
    "DraftCost",
    "EfficiencyCurve",
    "Figures",
    "KVOffload",
    "MLAShape",
    "MoEShape",
    "ModelDevices",
    "ModelLayout",
    "ModelShape",
    "ModelSummary",
    "ParamCount",
    "Performance",
    "Plan",
    "PlanOptions",
    "ReplicaChoice",
    "SharedDevices",
    "StageMemory",
    "StepEfficiency",
    "StepTime",
    "attention_params_per_device",
    "choose_parallelism",
    "choose_replicas",
    "communication",
    "count_parameters",
    "cpu_memory_slots",
    "dense_mlp_params",
    "draft_cost",
    "expected_efficiency",
    "expert_params",
    "experts_touched",
    "explicit_replicas",
    "host_slot_limit",
    "kv_bytes_per_token",
    "kv_bytes_per_token_per_layer",
    "load_model_config",
    "load_model_shape",
    "normalize_dtype",
    "parse_model_shape",
    "parse_speculative_config",
    "pipeline_stage_layers",
    "plan_deployment",
    "quantization_weight_dtype",
    "resolve_kv_dtype",
    "resolve_weight_dtype",
    "runtime_headroom_bytes",
    "share_devices",
    "shared_expert_params",
    "tp_violation",
    "weight_bytes",
    "worker_memory_gib",
]
