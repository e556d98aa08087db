"""Accelerator and CPU-node specs (memory, bandwidth, bf16 peak) the planner sizes deployments with."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import ConfigError


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


def _spec(key, name, mem, bw, tflops, link, source, *, is_cpu=False) -> DeviceSpec:
    return DeviceSpec(
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
