"""The planner's inputs besides the model: the machines (ClusterShape) and the workload and
knobs of a plan (PlanOptions)."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    computed_field,
    field_validator,
)

from cluster.device_specs import DeviceSpec
from cluster.planner.dtypes import KV_DTYPE_BYTES, WEIGHT_DTYPE_BYTES, normalize_dtype
from cluster.planner.engine_options import DraftCost


class ClusterShape(BaseModel):
    """What the planner needs to know about the machines: how many, how many devices, which."""

    model_config = ConfigDict(frozen=True)

    nodes: int = Field(default=1, ge=1, description="Machines in the cluster.")
    devices_per_node: int = Field(
        default=1, ge=1, description="Accelerators (or CPU slots) per node."
    )
    device: DeviceSpec = Field(description="The device every node has.")
    link_gbps: float = Field(
        default=100.0,
        gt=0,
        description="Network between nodes in Gbit/s (pipeline hops across nodes).",
    )

    @computed_field(description="nodes x devices_per_node.")
    @property
    def total_devices(self) -> int:
        return self.nodes * self.devices_per_node


class PlanOptions(BaseModel):
    """The workload and the knobs of a plan; defaults match `llamacluster plan`'s."""

    model_config = ConfigDict(frozen=True)

    dtype: str = Field(
        default="auto", description="Weight dtype: auto, bf16, fp16, fp8, int8, int4, fp32."
    )
    kv_dtype: str = Field(
        default="auto", description="KV-cache dtype: auto, bf16, fp16, fp8, fp32."
    )
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context the server must hold; None = the config's maximum."
    )
    prompt_len: int = Field(
        default=512, gt=0, description="Prompt tokens for the prefill estimate."
    )
    concurrency: int = Field(default=32, gt=0, description="Sequences decoding at once.")
    mem_fraction: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Share of device memory vLLM may use (gpu_memory_utilization).",
    )
    flops_efficiency: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Achieved / peak FLOP/s for the expected figures; None = the device "
        "family's fitted curve (the ideal bound always uses 1.0).",
    )
    bandwidth_efficiency: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Achieved / peak memory bandwidth for the expected figures; None = the "
        "device family's fitted curve (the ideal bound always uses 1.0).",
    )
    cost_per_hour: float | None = Field(
        default=None, gt=0, description="Price of the whole cluster per hour, in dollars."
    )
    quantization: str | None = Field(
        default=None,
        description="vLLM --quantization method (fp8, awq, gptq, ...): sets the weight dtype.",
    )
    speculative_config: dict[str, Any] | None = Field(
        default=None, description="vLLM --speculative-config (ngram, EAGLE, MTP, draft model)."
    )
    draft: DraftCost | None = Field(
        default=None,
        description="The speculative draft's memory, sized from speculative_config "
        "(cluster.planner.draft_cost); counted on the last pipeline stage.",
    )
    kv_offload_gib: float | None = Field(
        default=None,
        gt=0,
        description="vLLM --kv-offloading-size: host-memory KV cache in GiB, summed over the "
        "tensor-parallel ranks.",
    )
    tp: int | None = Field(default=None, ge=1, description="Force this tensor-parallel size.")
    pp: int | None = Field(default=None, ge=1, description="Force this pipeline-parallel size.")

    @field_validator("dtype", "kv_dtype")
    @classmethod
    def _check_dtypes(cls, value: str, info: ValidationInfo) -> str:
        if value == "auto":
            return value
        table = WEIGHT_DTYPE_BYTES if info.field_name == "dtype" else KV_DTYPE_BYTES
        flag = "--" + str(info.field_name).replace("_", "-")
        return normalize_dtype(value, allowed=table, what=flag)
