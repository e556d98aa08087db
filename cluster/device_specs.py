"""Accelerator and CPU-node specs (memory, bandwidth, bf16 peak) the planner sizes deployments with."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import ConfigError

if TYPE_CHECKING:
    from cluster.measure import CpuMeasurement, GpuMeasurement


class DeviceSpec(BaseModel):
    """One device as the planner sees it: what it holds, how fast it reads, how fast it multiplies.

    Memory is in GiB (2**30 bytes): a vendor's "80 GB" HBM is what nvidia-smi reports as about
    80 GiB (an A100 80GB shows 81920 MiB). Bandwidths are decimal (10**9 bytes/s), as datasheets
    give them.
    """

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="Short name used on the command line (--gpu).")
    name: str = Field(description="Marketing name, for display.")
    memory_gib: float = Field(gt=0, description="Device memory in GiB.")
    bandwidth_gbs: float = Field(gt=0, description="Peak memory bandwidth in GB/s (10**9 B/s).")
    bf16_tflops: float = Field(gt=0, description="Dense (no sparsity) bf16 tensor peak, TFLOP/s.")
    interconnect_gbs: float = Field(
        gt=0,
        description="Device-to-device bandwidth inside one node, GB/s per direction (NVLink or "
        "PCIe); tensor-parallel all-reduces and same-node pipeline hops use it.",
    )
    source: str = Field(description="Where the numbers come from.")
    is_cpu: bool = Field(default=False, description="A CPU socket/node rather than a GPU.")
    family: str = Field(
        default="cpu",
        description="Efficiency family (nvidia-hopper, nvidia-ampere, nvidia-ada, cpu): which "
        "fitted curve turns the ideal bound into the expected speed (cluster/planner/efficiency.py).",
    )
    measured: bool = Field(
        default=False,
        description="Bandwidth and FLOP/s were measured on the node (achieved rates, not "
        "datasheet peaks): the expected speed takes them at efficiency 1.0.",
    )
    layer_overhead_ms: float = Field(
        default=0.0,
        ge=0,
        description="Fixed time each layer adds to every step beyond its bytes and FLOPs (its "
        "kernel calls), measured on the node (CpuMeasurement.layer_overhead_ms); 0 for the "
        "table's devices, whose efficiency curves already hold it.",
    )
    host_link_gbs: float = Field(
        default=32,
        gt=0,
        description="Device-to-host link, GB/s per direction (PCIe 4.0 x16 32, PCIe 5.0 x16 64, "
        "NVLink-C2C 450); offloaded KV cache travels over it.",
    )
    measured_copy_gbs: float | None = Field(
        default=None,
        gt=0,
        description="Device-to-device copy rate a GPU node measured (GpuMeasurement.copy_gbs, "
        "bytes read + written), GB/s: the expected figures scale the family curve's memory "
        "side by it over the calibration device's; None: not measured.",
    )
    measured_matmul_tflops: float | None = Field(
        default=None,
        gt=0,
        description="Square bf16 matmul a GPU node measured, TFLOP/s: scales the curve's compute "
        "side over the calibration device's; None: not measured.",
    )
    measured_at: str | None = Field(
        default=None,
        description="Where and when the GPU rates were measured ('head 2026-11-30'), for the "
        "plan's notes.",
    )


# Efficiency family of each table entry (the rest: cpu) and host links other than PCIe 4.0.
_FAMILIES = {
    **dict.fromkeys(("a10", "a100-40gb", "a100-80gb", "rtx3060"), "nvidia-ampere"),
    **dict.fromkeys(("h100-sxm", "h100-pcie", "h200", "gh200"), "nvidia-hopper"),
    **dict.fromkeys(("l4", "l40s", "rtx4090"), "nvidia-ada"),
}
_HOST_LINKS = {"h100-sxm": 64, "h100-pcie": 64, "h200": 64, "gh200": 450}


def _spec(key, name, mem, bw, tflops, link, source, *, is_cpu=False) -> DeviceSpec:
    return DeviceSpec(
        family=_FAMILIES.get(key, "cpu"),
        host_link_gbs=_HOST_LINKS.get(key, 32),
        key=key,
        name=name,
        memory_gib=mem,
        bandwidth_gbs=bw,
        bf16_tflops=tflops,
        interconnect_gbs=link,
        source=source,
        is_cpu=is_cpu,
    )


# Dense bf16 peaks: datasheets print "with sparsity" figures, which are twice the dense ones.
# Interconnect per direction: NVLink 3 (A100) 600 GB/s total = 300 each way; NVLink 4 (Hopper)
# 900 GB/s total = 450; PCIe 4.0 x16 ~32 GB/s each way; PCIe 5.0 x16 ~64 GB/s each way.
DEVICES: dict[str, DeviceSpec] = {
    s.key: s
    for s in (
        # NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s, BF16 125 TF (250 with sparsity), PCIe 4.0.
        _spec("a10", "NVIDIA A10", 24, 600, 125, 32, "NVIDIA A10 datasheet"),
        # NVIDIA A100 datasheet (SXM4 40GB): 1,555 GB/s HBM2, BF16 312 TF, NVLink 600 GB/s.
        _spec("a100-40gb", "NVIDIA A100 SXM4 40GB", 40, 1555, 312, 300, "NVIDIA A100 datasheet"),
        # NVIDIA A100 datasheet (SXM4 80GB): 2,039 GB/s HBM2e, BF16 312 TF, NVLink 600 GB/s.
        _spec("a100-80gb", "NVIDIA A100 SXM4 80GB", 80, 2039, 312, 300, "NVIDIA A100 datasheet"),
        # NVIDIA H100 datasheet (SXM): 3.35 TB/s HBM3, BF16 1,979 TF sparse = 989 dense, NVLink 900.
        _spec("h100-sxm", "NVIDIA H100 SXM5 80GB", 80, 3350, 989, 450, "NVIDIA H100 datasheet"),
        # NVIDIA H100 datasheet (PCIe): 2 TB/s HBM2e, BF16 1,513 TF sparse = 756 dense, PCIe 5.0.
        _spec("h100-pcie", "NVIDIA H100 PCIe 80GB", 80, 2000, 756, 64, "NVIDIA H100 datasheet"),
        # NVIDIA H200 datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TF sparse = 989 dense.
        _spec("h200", "NVIDIA H200 SXM 141GB", 141, 4800, 989, 450, "NVIDIA H200 datasheet"),
        # NVIDIA GH200 datasheet: 96 GB HBM3 at 4 TB/s (the 144 GB HBM3e part: 4.9 TB/s), GPU
        # BF16 989 TF dense, NVLink 900 GB/s between superchips.
        _spec("gh200", "NVIDIA GH200 96GB", 96, 4000, 989, 450, "NVIDIA GH200 datasheet"),
        # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, BF16 242 TF sparse = 121 dense, PCIe 4.0.
        _spec("l4", "NVIDIA L4", 24, 300, 121, 32, "NVIDIA L4 datasheet"),
        # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 733 TF sparse = 362 dense, PCIe 4.0.
        _spec("l40s", "NVIDIA L40S", 48, 864, 362, 32, "NVIDIA L40S datasheet"),
        # GeForce RTX 3060 (12 GB) spec page: 15 Gbps GDDR6 on 192 bits = 360 GB/s. bf16 peak
        # from the NVIDIA Ampere GA102 whitepaper's per-SM tensor rate (GeForce: FP32-accumulate
        # at half the FP16-accumulate rate): 28 SMs x 1.777 GHz x 512 FLOP/clk = 25.5 TF dense.
        _spec(
            "rtx3060",
            "NVIDIA GeForce RTX 3060 12GB",
            12,
            360,
            25.5,
            32,
            "GeForce RTX 3060 spec page; NVIDIA Ampere GA102 whitepaper",
        ),
        # NVIDIA Ada Lovelace whitepaper (RTX 4090): 24 GB GDDR6X, 1,008 GB/s, BF16 with FP32
        # accumulate 165.2 TF dense (330.3 sparse), PCIe 4.0.
        _spec(
            "rtx4090",
            "NVIDIA GeForce RTX 4090",
            24,
            1008,
            165.2,
            32,
            "NVIDIA Ada Lovelace GPU architecture whitepaper",
        ),
        # Not a datasheet: a placeholder for "one CPU node" (a 2-socket server with 8 DDR4/DDR5
        # channels reaches 100-300 GB/s; AVX-512/AMX bf16 a few TFLOP/s). Measure your node and
        # pass --gpu-mem-gb / --mem-bandwidth-gbs / --tflops.
        _spec("cpu", "generic CPU node", 128, 100, 2.0, 20, "placeholder (override)", is_cpu=True),
    )
}

# Spellings people type, mapped to the table's keys.
_ALIASES = {
    "a100": "a100-80gb",
    "a100-80": "a100-80gb",
    "a100-sxm-80gb": "a100-80gb",
    "a100-40": "a100-40gb",
    "a100-sxm-40gb": "a100-40gb",
    "h100": "h100-sxm",
    "h100-80gb": "h100-sxm",
    "h100-sxm-80gb": "h100-sxm",
    "h100-pcie-80gb": "h100-pcie",
    "h200-sxm": "h200",
    "a10g": "a10",
    "3060": "rtx3060",
    "rtx-3060": "rtx3060",
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
}


def get_device(
    name: str,
    *,
    memory_gib: float | None = None,
    bandwidth_gbs: float | None = None,
    bf16_tflops: float | None = None,
    interconnect_gbs: float | None = None,
) -> DeviceSpec:
    """The spec for ``name`` (table key or alias, any case) with any given value overridden.

    Overrides let a person plan for hardware the table lacks, or use measured numbers instead of
    datasheet peaks. An unknown name is a ConfigError listing the known ones.
    """
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    spec = DEVICES.get(key)
    if spec is None:
        raise ConfigError(
            f"unknown device {name!r}",
            hint=f"choose one of {', '.join(DEVICES)} (and override numbers with --gpu-mem-gb, "
            "--mem-bandwidth-gbs, --tflops)",
        )
    changes = {
        field: value
        for field, value in (
            ("memory_gib", memory_gib),
            ("bandwidth_gbs", bandwidth_gbs),
            ("bf16_tflops", bf16_tflops),
            ("interconnect_gbs", interconnect_gbs),
        )
        if value is not None
    }
    for field, value in changes.items():
        if value <= 0:
            raise ConfigError(f"{field} must be positive, got {value}", hint="pass a number > 0")
    if changes:
        spec = spec.model_copy(update={**changes, "source": f"{spec.source}, overridden"})
    return spec


def measured_cpu_device(
    measurement: CpuMeasurement,
    *,
    slots: int = 1,
    memory_gib: float | None = None,
    where: str = "this machine",
) -> DeviceSpec:
    """The CPU entry with what a node measured (cluster/measure.py): one of its ``slots`` worker
    slots gets an equal share of the node's weight-streaming rate (the engine's matmul kernel at
    batch 1, else the streaming read) and matmul throughput, and pays the measured fixed cost per
    layer (0 when the measurement predates it).

    The result is marked ``measured`` (achieved rates, not datasheet peaks). ``memory_gib``
    overrides the placeholder's memory, as ``get_device`` does.
    """
    if slots < 1:
        raise ConfigError(f"slots must be at least 1, got {slots}", hint="pass --cpu-slots >= 1")
    base = get_device("cpu", memory_gib=memory_gib)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(measurement.at))
    share = f", 1/{slots} per slot" if slots > 1 else ""
    return base.model_copy(
        update={
            "name": f"CPU slot ({measurement.threads // slots or 1} cores)",
            "bandwidth_gbs": measurement.weight_stream_gbs / slots,
            "bf16_tflops": measurement.matmul_tflops / slots,
            "layer_overhead_ms": measurement.layer_overhead_ms or 0.0,
            "measured": True,
            "source": f"measured on {where} {when}: {measurement.describe()}{share}",
        }
    )


# nvidia-smi names to table keys: the first substring found wins (longer names first, so
# "a100" does not read as "a10" nor "h100 pcie" as "h100").
_SMI_NAMES = (
    ("gh200", "gh200"),
    ("h200", "h200"),
    ("h100 pcie", "h100-pcie"),
    ("h100", "h100-sxm"),
    ("a100-sxm4-40gb", "a100-40gb"),
    ("a100-pcie-40gb", "a100-40gb"),
    ("a100", "a100-80gb"),
    ("l40s", "l40s"),
    ("a10", "a10"),
    ("l4", "l4"),
    ("4090", "rtx4090"),
    ("3060", "rtx3060"),
)


def device_for_gpu_name(gpu_name: str) -> DeviceSpec | None:
    """The table's spec for a GPU as nvidia-smi names it ("NVIDIA H200"), or None if unknown."""
    name = gpu_name.strip().lower()
    for needle, key in _SMI_NAMES:
        if needle in name:
            return DEVICES[key]
    return None


#: Efficiency family of a measured GPU the table does not know (its curve: a fallback one).
UNLISTED_GPU_FAMILY = "nvidia-unlisted"


def measured_gpu_device(
    measurement: GpuMeasurement,
    *,
    memory_gib: float | None = None,
    where: str = "this machine",
) -> DeviceSpec:
    """The table's entry for a node's GPU (by the name CUDA gives its slowest device) with what
    the node measured (cluster/measure.py): its memory, and its copy and matmul rates for the
    expected figures to scale the family curve by (cluster/planner/efficiency.py). A GPU the
    table lacks gets the measured rates as its peaks and a fallback curve. ``memory_gib``
    overrides the measured memory."""
    slowest = measurement.slowest
    when = time.strftime("%Y-%m-%d", time.localtime(measurement.at))
    memory = memory_gib or min(d.memory_gib for d in measurement.devices)
    if memory <= 0:
        raise ConfigError(f"memory_gib must be positive, got {memory}", hint="pass a number > 0")
    found = f"measured on {where} {when}: {measurement.describe()}"
    base = device_for_gpu_name(slowest.name)
    if base is None:
        base = DeviceSpec(
            key="gpu",
            name=slowest.name,
            memory_gib=memory,
            bandwidth_gbs=measurement.copy_gbs,
            bf16_tflops=measurement.matmul_tflops,
            interconnect_gbs=32,  # unknown: PCIe 4.0 x16, the slowest a data-centre GPU has
            family=UNLISTED_GPU_FAMILY,
            source=f"not in the table: measured rates taken as its peaks; {found}",
        )
    else:
        base = base.model_copy(update={"source": f"{base.source}; {found}"})
    return base.model_copy(
        update={
            "memory_gib": memory,
            "measured_copy_gbs": measurement.copy_gbs,
            "measured_matmul_tflops": measurement.matmul_tflops,
            "measured_at": f"{where} {when}",
        }
    )
