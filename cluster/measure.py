"""Measured speed of the nodes and of the links between them, for the planner instead of guesses.

A remote program (the contract: cluster/remote.py, docs/CLUSTER.md "Remote programs"), run with
the shared env's python by the `measure` stage of `up` and by `llamacluster plan --measure`:
``python -m cluster.measure VERB`` with one JSON request on stdin.

======= ============== ====================================================================
verb    request        reply (``"ok": true`` and ...)
======= ============== ====================================================================
cpu     CpuRequest     the CpuMeasurement fields: read/copy/triad/gemv GB/s, matmul TFLOP/s,
                       the fixed cost of a decode layer's kernel calls
receive ReceiveRequest ``connections``: bytes and seconds each sender connection delivered
send    SendRequest    the LinkMeasurement fields but src/dst: Gbit/s and round-trip time
gpu     GpuRequest     the GpuMeasurement fields: per CUDA device its name, memory, copy
                       GB/s, bf16 matmul TFLOP/s and batch-1 weight-streaming GB/s
======= ============== ====================================================================

The CPU benchmark runs multi-threaded on every core the process may use (as the engine's
OpenMP threads do): a read (sum), a copy and a triad over arrays far larger than any cache, and
a square matrix multiply in the dtype the engine serves in (bf16 where the CPU has avx512_bf16 or
AMX, else fp32), with torch when the env has it, numpy otherwise. With torch it also times the
fixed cost a decode layer pays whatever its size: the per-call cost of the engine's dense kernel
(a small matrix streamed from memory, less its bytes at the gemv rate) and one layer's small
kernels (norms, rotary, activation, attention over a short context) at a small, cache-resident
shape. The link test streams TCP from
the head to a worker on the cluster's private addresses for a couple of seconds (a few
connections, as one stream rarely fills a fast link) and times the round trip of one-byte
messages on the same connection. The GPU benchmark times, on each visible CUDA device, a
device-to-device copy of large buffers (bytes read + written, as the planner's calibration
counts them), a square bf16 matmul, and decode's weight streaming: a batch-1 matmul over a ring
of weight matrices of a few sizes (together far beyond the L2 cache), replayed as one CUDA graph
as the engine replays its decode steps. Only the standard library and pydantic are imported at
the top: torch or numpy are imported by the cpu and gpu verbs alone.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from cluster.remote import RemoteCall, Request, Verb, VerbFailed, main

MODULE = "cluster.measure"
"""What ``python -m`` runs."""

Dtype = Literal["bf16", "fp32"]

#: Dense kernel calls in one decoder layer as vLLM runs a Llama-style model: fused q/k/v,
#: attention output, fused gate/up, down.
DENSE_CALLS_PER_LAYER = 4
#: Side of the square matrices whose per-call cost is timed (a small model's projection).
SMALL_GEMV_SIDE = 1024
#: The decode layer whose small kernels are timed: hidden size, heads of 64, context tokens.
LAYER_HIDDEN, LAYER_HEADS, LAYER_CONTEXT = 1024, 16, 128
#: Timed repetitions of that layer per run (one layer takes tens of microseconds).
LAYER_LOOPS = 200

#: Bytes per write of the link test's sender.
CHUNK_BYTES = 1 << 20
#: The reply a receiver sends on each connection once its sender is done: bytes, seconds.
_DONE = struct.Struct("!Qd")
_PING, _BULK = b"p", b"b"


class CpuMeasurement(BaseModel):
    """What one node's CPU and memory did in the micro-benchmark (whole node, all threads)."""

    read_gbs: float = Field(gt=0, description="Streaming read (sum of a large array), GB/s.")
    copy_gbs: float = Field(gt=0, description="Copy a to b, bytes read + written, GB/s.")
    triad_gbs: float = Field(gt=0, description="a = b + s*c, bytes read + written, GB/s.")
    gemv_gbs: float | None = Field(
        default=None,
        gt=0,
        description="Weights streamed by the engine's own matmul kernel at batch 1 (decode), in "
        "`dtype`, GB/s; None in measurements from before it was taken.",
    )
    gemv_kernel: str | None = Field(default=None, description="The kernel gemv_gbs timed.")
    gemv_call_ms: float | None = Field(
        default=None,
        ge=0,
        description=f"Fixed cost of one call of that kernel at batch 1: a {SMALL_GEMV_SIDE} x "
        f"{SMALL_GEMV_SIDE} matrix streamed from memory took this much longer than its bytes at "
        "gemv_gbs, ms; None where not measured (numpy, older measurements).",
    )
    layer_kernels_ms: float | None = Field(
        default=None,
        ge=0,
        description="One decode layer's kernels other than the dense ones (two fused add + "
        f"RMSNorm, rotary, SiLU-and-mul, attention over {LAYER_CONTEXT} tokens) at hidden "
        f"{LAYER_HIDDEN}, {LAYER_HEADS} heads of 64, cache resident, ms; None where not measured.",
    )
    matmul_tflops: float = Field(gt=0, description="Square matmul in `dtype`, TFLOP/s.")
    dtype: Dtype = Field(description="The dtype of the matmul: the one the engine serves in.")
    matmul_size: int = Field(description="Side of the square matrices multiplied.")
    threads: int = Field(
        ge=1,
        description="Threads the benchmark ran: the engine's (usable cores less one per slot).",
    )
    slots: int = Field(default=1, ge=1, description="Worker slots the node runs the engine in.")
    array_mib: int = Field(ge=1, description="Size of each array of the bandwidth tests, MiB.")
    library: Literal["torch", "numpy"] = Field(description="Which library ran the kernels.")
    seconds: float = Field(ge=0, description="Wall time of the whole benchmark.")
    at: float = Field(default_factory=time.time, description="When it ran (epoch seconds).")
    machine_id: str | None = Field(
        default=None, description="The machine it ran on (nodes on one machine share it)."
    )

    @property
    def weight_stream_gbs(self) -> float:
        """The rate decode reads weights at: the engine kernel's batch-1 rate when measured,
        else the streaming read."""
        return self.gemv_gbs or self.read_gbs

    @property
    def layer_overhead_ms(self) -> float | None:
        """Fixed time one decode layer adds to a step beyond its bytes: its dense kernel calls'
        per-call cost plus its small kernels; None when either was not measured."""
        if self.gemv_call_ms is None or self.layer_kernels_ms is None:
            return None
        return DENSE_CALLS_PER_LAYER * self.gemv_call_ms + self.layer_kernels_ms

    def describe(self) -> str:
        """One line for a person: ``read 30.1 GB/s, ..., bf16 matmul 0.43 TFLOP/s (...)``."""
        gemv = f", {self.dtype} gemv {self.gemv_gbs:.1f} GB/s" if self.gemv_gbs else ""
        layer = self.layer_overhead_ms
        fixed = f", {layer:.3f} ms per layer" if layer is not None else ""
        return (
            f"read {self.read_gbs:.1f} GB/s, copy {self.copy_gbs:.1f} GB/s, triad "
            f"{self.triad_gbs:.1f} GB/s{gemv}, {self.dtype} matmul {self.matmul_tflops:.3g} "
            f"TFLOP/s{fixed} ({self.threads} threads, {self.library})"
        )


class LinkMeasurement(BaseModel):
    """TCP from one node to another over their private addresses."""

    src: str = Field(description="Sending node (the head).")
    dst: str = Field(description="Receiving node.")
    dst_ip: str = Field(description="The receiver's private IP the test connected to.")
    gbps: float = Field(gt=0, description="Goodput, Gbit/s (10**9 bit/s), all streams together.")
    rtt_ms: float = Field(ge=0, description="Median round trip of a one-byte message, ms.")
    streams: int = Field(ge=1, description="Parallel TCP connections of the bulk test.")
    bytes: int = Field(ge=0, description="Bytes the receiver counted.")
    seconds: float = Field(ge=0, description="Receiver's time from first to last byte.")
    at: float = Field(default_factory=time.time, description="When it ran (epoch seconds).")

    def describe(self) -> str:
        """``head → worker1 9.41 Gbit/s, RTT 0.121 ms``."""
        return f"{self.src} → {self.dst} {self.gbps:.3g} Gbit/s, RTT {self.rtt_ms:.3g} ms"


class GpuDeviceMeasurement(BaseModel):
    """What one CUDA device did in the GPU micro-benchmark."""

    index: int = Field(ge=0, description="The device's CUDA index as the process saw it.")
    name: str = Field(description="torch.cuda.get_device_name: 'NVIDIA H200', ...")
    memory_gib: float = Field(gt=0, description="The device's total memory, GiB.")
    copy_gbs: float = Field(
        gt=0,
        description="Device-to-device copy of two large buffers, bytes read + written, GB/s "
        "(as the planner's calibration file counts its copy_tb_s).",
    )
    copy_mib: int = Field(ge=1, description="Size of each buffer the copy used, MiB.")
    matmul_tflops: float = Field(gt=0, description="Square bf16 matmul, TFLOP/s.")
    matmul_size: int = Field(ge=1, description="Side of the square matrices multiplied.")
    stream_gbs: dict[int, float] = Field(
        description="Per weight-matrix size in MiB: weights read by a batch-1 bf16 matmul (a "
        "decode step's dense layers) over a ring of such matrices far beyond the L2 cache, "
        "replayed as one CUDA graph, GB/s."
    )
    seconds: float = Field(ge=0, description="Wall time of this device's benchmark.")


class GpuMeasurement(BaseModel):
    """What one node's CUDA devices did in the GPU micro-benchmark (each device alone)."""

    devices: list[GpuDeviceMeasurement] = Field(
        min_length=1, description="One entry per device measured, in CUDA index order."
    )
    torch: str = Field(description="The torch version that ran the kernels.")
    seconds: float = Field(ge=0, description="Wall time of the whole benchmark.")
    at: float = Field(default_factory=time.time, description="When it ran (epoch seconds).")
    machine_id: str | None = Field(
        default=None, description="The machine it ran on (nodes on one machine share it)."
    )

    @property
    def slowest(self) -> GpuDeviceMeasurement:
        """The device with the lowest copy rate: a tp group or pipeline waits for it."""
        return min(self.devices, key=lambda d: d.copy_gbs)

    @property
    def copy_gbs(self) -> float:
        """The slowest device's copy rate, GB/s."""
        return self.slowest.copy_gbs

    @property
    def matmul_tflops(self) -> float:
        """The slowest matmul of the node's devices, TFLOP/s."""
        return min(d.matmul_tflops for d in self.devices)

    def describe(self) -> str:
        """One line for a person: ``8 x NVIDIA H200 140.4 GiB: copy 4.25 TB/s, ...``."""
        d = self.slowest
        sizes = sorted(d.stream_gbs)
        stream = "/".join(f"{d.stream_gbs[s] / 1e3:.2f}" for s in sizes)
        mib = "/".join(str(s) for s in sizes)
        count = f"{len(self.devices)} x " if len(self.devices) > 1 else ""
        of = f" (slowest of {len(self.devices)})" if len(self.devices) > 1 else ""
        return (
            f"{count}{d.name} {d.memory_gib:.1f} GiB: copy {d.copy_gbs / 1e3:.2f} TB/s, bf16 "
            f"matmul {d.matmul_tflops:.0f} TFLOP/s, batch-1 weights {stream} TB/s at {mib} "
            f"MiB{of}"
        )


# ------------------------------------------------------------------------------ pure parts


def serving_dtype(flags: set[str] | frozenset[str], *, arch: str = "x86_64") -> Dtype:
    """The dtype vLLM's CPU backend computes in on a CPU with ``flags``: bf16 where the CPU has
    native bf16 dot products (avx512_bf16 or AMX), else fp32."""
    if arch.lower() in ("x86_64", "amd64") and flags & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    return "fp32"


def best_rate(amount: float, times: list[float]) -> float:
    """``amount`` per second at the fastest of ``times`` (a benchmark's usual estimator: noise
    from other processes only ever slows a run down)."""
    fastest = min(t for t in times if t > 0)
    return amount / fastest


def call_overhead_s(call_s: float, call_bytes: float, stream_bytes_per_s: float) -> float:
    """Fixed time of one kernel call: how much longer one call over ``call_bytes`` took than
    streaming them at ``stream_bytes_per_s`` (never below zero: noise can make it so)."""
    return max(0.0, call_s - call_bytes / stream_bytes_per_s)


def link_gbps(nbytes: int, seconds: float) -> float:
    """Goodput in Gbit/s (decimal) of ``nbytes`` delivered in ``seconds``."""
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    return nbytes * 8 / seconds / 1e9


def engine_threads(cores: int, slots: int) -> int:
    """Threads the engine computes with on a node: vLLM's CPU backend keeps one core per local
    worker for its scheduler and gives the rest to the workers' OpenMP threads."""
    return max(1, cores - slots)


def slowest_link(links: dict[str, LinkMeasurement]) -> LinkMeasurement | None:
    """The link the planner should assume between nodes: the slowest one measured."""
    return min(links.values(), key=lambda link: link.gbps, default=None)


# ---------------------------------------------------------------------------- cpu benchmark


class CpuRequest(Request):
    """Run the CPU micro-benchmark."""

    dtype: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="Matmul dtype; auto: the engine's (serving_dtype)."
    )
    threads: int | None = Field(
        default=None, ge=1, description="Default: engine_threads(usable cores, slots)."
    )
    slots: int = Field(default=1, ge=1, le=1024, description="Worker slots on this node.")
    array_mib: int = Field(default=256, ge=8, le=16384, description="Each array's size, MiB.")
    repeats: int = Field(default=3, ge=1, le=100, description="Runs of each kernel (best kept).")
    library: Literal["auto", "torch", "numpy"] = Field(default="auto")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _available_mib() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _timed(fn: Any, repeats: int) -> list[float]:
    fn()  # first touch and warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _torch_kernels(n: int, threads: int, dtype: Dtype) -> tuple[dict[str, Any], Any, Any, Any]:
    import torch

    torch.set_num_threads(threads)
    a, b, c = torch.empty(n), torch.ones(n), torch.full((n,), 2.0)
    kernels = {
        "read": lambda: b.sum(),
        "copy": lambda: a.copy_(b),
        "triad": lambda: torch.add(b, c, alpha=3.0, out=a),
    }
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    def matmul(size: int) -> Any:
        x = torch.randn(size, size).to(torch_dtype)
        y = torch.randn(size, size).to(torch_dtype)
        return lambda: torch.mm(x, y)

    def gemv(total_bytes: int, side: int = 4096) -> tuple[Any, str, int, int]:
        # Decode: one token's activations times every weight matrix, side x side each, as many
        # as fill ``total_bytes`` (far beyond any cache), through the kernel vLLM's CPU backend
        # runs for dense layers (oneDNN, weights prepacked) when vLLM is there.
        per = side * side * (2 if dtype == "bf16" else 4)
        count = max(2, total_bytes // per)
        x = torch.full((1, side), 0.01, dtype=torch_dtype)
        weights = [torch.full((side, side), 0.01, dtype=torch_dtype) for _ in range(count)]
        try:
            from vllm import _custom_ops as ops

            if ops._supports_onednn:
                handlers = [ops.create_onednn_mm(w.t(), 32) for w in weights]
                weights.clear()
                calls = [lambda h=h: ops.onednn_mm(h, x, None) for h in handlers]
                return lambda: [c() for c in calls], "vLLM onednn_mm", count * per, count
        except ImportError:
            pass
        linear = torch.nn.functional.linear
        return lambda: [linear(x, w) for w in weights], "torch linear", count * per, count

    def layer() -> Any:
        # One decode token through a layer's small kernels, vLLM's own where it has them (the
        # engine's compiled graph may fuse some: this is the unfused, upper end).
        hidden, heads, dim = LAYER_HIDDEN, LAYER_HEADS, LAYER_HIDDEN // LAYER_HEADS
        x = torch.full((1, hidden), 0.01, dtype=torch_dtype)
        residual, norm_weight = x.clone(), torch.ones(hidden, dtype=torch_dtype)
        inter = -(-8 * hidden // 3 // 64) * 64  # Llama's MLP width, a multiple of 64
        gate_up = torch.full((1, 2 * inter), 0.01, dtype=torch_dtype)
        act = torch.empty(1, inter, dtype=torch_dtype)
        q = torch.full((1, heads * dim), 0.01, dtype=torch_dtype)
        k = torch.full((1, heads // 2 * dim), 0.01, dtype=torch_dtype)
        positions = torch.tensor([LAYER_CONTEXT], dtype=torch.long)
        cos_sin = torch.full((LAYER_CONTEXT + 1, dim), 0.5, dtype=torch_dtype)
        kv_heads, block = heads // 2, 32
        try:
            from vllm import _custom_ops as ops

            norm = lambda: ops.fused_add_rms_norm(x, residual, norm_weight, 1e-6)  # noqa: E731
            rotary = lambda: ops.rotary_embedding(positions, q, k, dim, cos_sin, True)  # noqa: E731
            silu = lambda: torch.ops._C.silu_and_mul(act, gate_up)  # noqa: E731
            attention = _vllm_cpu_attention(ops, torch_dtype, heads, kv_heads, dim, block)
        except (ImportError, AttributeError, RuntimeError):
            rms_norm = torch.nn.functional.rms_norm
            norm = lambda: rms_norm(x + residual, (hidden,), norm_weight, 1e-6)  # noqa: E731
            rotary = lambda: (q * cos_sin[0, 0], k * cos_sin[0, 0])  # noqa: E731
            silu = lambda: torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # noqa: E731
            cache = torch.full((1, kv_heads, LAYER_CONTEXT, dim), 0.01, dtype=torch.float32)
            query = torch.full((1, kv_heads, 1, dim), 0.01, dtype=torch.float32)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            attention = lambda: sdpa(query, cache, cache)  # noqa: E731

        def one_layer() -> None:
            norm()
            rotary()
            attention()
            norm()
            silu()

        return lambda: [one_layer() for _ in range(LAYER_LOOPS)]

    return kernels, matmul, gemv, layer


def _vllm_cpu_attention(
    ops: Any, dtype: Any, heads: int, kv_heads: int, dim: int, block: int
) -> Any:
    """One decode token's attention over LAYER_CONTEXT cached tokens through vLLM's CPU
    attention kernels (write the new key and value into the paged cache, then attend), with
    the cache laid out as vLLM's CPU backend lays it out; a call that fails raises."""
    import torch

    from cluster import cpu_features

    # The kernel vLLM's CPU backend picks (cluster.cpu_features says which for bf16; importing
    # vLLM's own picker would cost seconds); AMX is a bf16 kernel only.
    arch = cpu_features.local_arch()
    picked = cpu_features.engine_kernels(
        cpu_features.local_flags(), arch=arch, amx_grant=cpu_features.amx_permitted()
    ).attention
    if picked == "native":
        picked = "neon" if arch == "aarch64" else picked
    isa = "vec" if picked == "amx" and dtype != torch.bfloat16 else picked
    blocks = LAYER_CONTEXT // block + 1
    kv = torch.full((blocks, kv_heads, block, 2 * dim), 0.01, dtype=dtype)
    key_cache, value_cache = kv.view(blocks, kv_heads, 2 * block, dim).chunk(2, dim=2)
    seq_lens = torch.tensor([LAYER_CONTEXT + 1], dtype=torch.int32)
    starts = torch.tensor([0, 1], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=dim,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=starts,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=False,
    )
    block_table = torch.arange(blocks, dtype=torch.int32).view(1, blocks)
    slot = torch.tensor([LAYER_CONTEXT], dtype=torch.long)
    query = torch.full((1, heads, dim), 0.01, dtype=dtype)
    new_kv, out = torch.full((1, kv_heads, dim), 0.01, dtype=dtype), torch.empty_like(query)

    def attend() -> None:
        ops.cpu_attn_reshape_and_cache(new_kv, new_kv, key_cache, value_cache, slot, isa)
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=starts,
            seq_lens=seq_lens,
            scale=dim**-0.5,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=block_table,
            softcap=0.0,
            scheduler_metadata=metadata,
            s_aux=None,
        )

    attend()  # fail here, not inside the timed loop
    return attend


def _numpy_kernels(n: int, threads: int, dtype: Dtype) -> tuple[dict[str, Any], Any, Any, None]:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    if dtype == "bf16":
        raise VerbFailed("numpy has no bf16: ask for dtype fp32, or install torch in the env")
    a, b, c = np.empty(n, np.float32), np.ones(n, np.float32), np.full(n, 2.0, np.float32)
    a.fill(0)  # touch every page once, outside the timed runs
    pool = ThreadPoolExecutor(threads)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def each(work: Any) -> Any:
        # numpy releases the GIL inside these loops: one slice per thread runs in parallel.
        return lambda: list(pool.map(lambda lo_hi: work(*lo_hi), bounds))

    kernels = {
        "read": each(lambda lo, hi: b[lo:hi].sum()),
        "copy": each(lambda lo, hi: np.copyto(a[lo:hi], b[lo:hi])),
        # a = b + c: the same bytes as a triad (numpy has no fused multiply-add).
        "triad": each(lambda lo, hi: np.add(b[lo:hi], c[lo:hi], out=a[lo:hi])),
    }

    def matmul(size: int) -> Any:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((size, size), dtype=np.float32)
        y = rng.standard_normal((size, size), dtype=np.float32)
        return lambda: x @ y

    def gemv(total_bytes: int, side: int = 4096) -> tuple[Any, str, int, int]:
        count = max(2, total_bytes // (side * side * 4))
        x = np.full(side, 0.01, np.float32)
        weights = [np.full((side, side), 0.01, np.float32) for _ in range(count)]
        return lambda: [w @ x for w in weights], "numpy matvec", count * side * side * 4, count

    # The engine runs torch, not numpy: no layer costs from here.
    return kernels, matmul, gemv, None


def _library(asked: str) -> str:
    for name in ("torch", "numpy") if asked == "auto" else (asked,):
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    raise VerbFailed(
        f"neither torch nor numpy imports with {sys.executable}",
        hint="run it with the cluster's env python (vLLM brings torch), or pip install numpy",
    )


def cpu(req: CpuRequest) -> dict[str, Any]:
    """Measure this node's memory bandwidth and matmul throughput (a few seconds)."""
    from cluster import cpu_features

    started = time.perf_counter()
    flags = cpu_features.local_flags()
    dtype: Dtype = (
        serving_dtype(flags, arch=cpu_features.local_arch()) if req.dtype == "auto" else req.dtype
    )
    if "amx_tile" in flags:
        cpu_features.request_amx()  # oneDNN's bf16 matmul uses AMX only once Linux grants it
    library = _library(req.library)
    if library == "numpy" and req.dtype == "auto":
        dtype = "fp32"
    threads = req.threads or engine_threads(_usable_cores(), req.slots)
    available = _available_mib()
    # Three arrays live at once: keep them well inside the free memory.
    array_mib = req.array_mib if available is None else min(req.array_mib, available // 8)
    if array_mib < 8:
        raise VerbFailed(f"only {available} MiB of memory available: too little to measure")
    n = array_mib * (1 << 20) // 4  # fp32 elements
    build = _torch_kernels if library == "torch" else _numpy_kernels
    kernels, matmul, gemv, layer = build(n, threads, dtype)
    nbytes = n * 4
    read = best_rate(nbytes, _timed(kernels["read"], req.repeats)) / 1e9
    copy = best_rate(2 * nbytes, _timed(kernels["copy"], req.repeats)) / 1e9
    triad = best_rate(3 * nbytes, _timed(kernels["triad"], req.repeats)) / 1e9
    del kernels  # free the arrays before the weights of the next test
    stream, kernel, weight_bytes, _ = gemv(nbytes)
    gemv_gbs = best_rate(weight_bytes, _timed(stream, req.repeats)) / 1e9
    del stream
    call_ms = kernels_ms = None
    if layer is not None:
        # Small matrices filling half as many bytes (still far beyond the caches): each call
        # pays a fixed cost on top of its bytes; the big ones above hide it.
        stream, _, small_bytes, calls = gemv(nbytes // 2, SMALL_GEMV_SIDE)
        per_call = min(_timed(stream, req.repeats)) / calls
        del stream
        call_ms = call_overhead_s(per_call, small_bytes / calls, gemv_gbs * 1e9) * 1e3
        kernels_ms = min(_timed(layer(), req.repeats)) / LAYER_LOOPS * 1e3
    # The smallest matrix that keeps the cores busy for a while: double from 1024 until one
    # multiply takes 50 ms (at most 8192).
    size = 1024
    while True:
        run = matmul(size)
        times = _timed(run, 1)
        if times[0] >= 0.05 or size >= 8192:
            break
        size *= 2
    if req.repeats > 1:
        times += _timed(run, req.repeats - 1)
    tflops = best_rate(2 * size**3, times) / 1e12
    return CpuMeasurement(
        read_gbs=read,
        copy_gbs=copy,
        triad_gbs=triad,
        gemv_gbs=gemv_gbs,
        gemv_kernel=kernel,
        gemv_call_ms=call_ms,
        layer_kernels_ms=kernels_ms,
        matmul_tflops=tflops,
        dtype=dtype,
        matmul_size=size,
        threads=threads,
        slots=req.slots,
        array_mib=array_mib,
        library=library,  # type: ignore[arg-type]
        seconds=time.perf_counter() - started,
    ).model_dump()


# ---------------------------------------------------------------------------- gpu benchmark

#: Columns of the weight matrices the streaming test multiplies a token by (a 7-8B model's
#: hidden size): each matrix of N MiB has N MiB / (this x 2 bytes) rows.
STREAM_HIDDEN = 4096
#: The streaming test's ring of matrices holds at least this much (far beyond any L2 cache),
#: so every replay reads its weights from device memory, as a decode step does.
STREAM_RING_MIB = 1024
#: Calls per timed run of the copy and the matmul.
GPU_REPS = 10


class GpuRequest(Request):
    """Run the GPU micro-benchmark on every visible CUDA device, or on ``devices``."""

    devices: list[int] | None = Field(
        default=None, description="CUDA indexes to measure; default: every visible one."
    )
    copy_mib: int = Field(
        default=2048,
        ge=16,
        le=65536,
        description="Each copy buffer, MiB (the calibration's 2 GiB).",
    )
    matmul_size: int = Field(default=8192, ge=256, le=32768, description="Square matmul side.")
    stream_mib: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default=[16, 64, 256],
        min_length=1,
        max_length=8,
        description="Weight-matrix sizes of the streaming test, MiB each.",
    )
    repeats: int = Field(default=3, ge=1, le=20, description="Timed runs per kernel (best kept).")


def copy_rate_gbs(buffer_bytes: int, seconds_per_copy: float) -> float:
    """GB/s of one device-to-device copy of ``buffer_bytes``: read plus written bytes, as the
    calibration file's copy_tb_s counts them."""
    return 2 * buffer_bytes / seconds_per_copy / 1e9


def matmul_tflops(size: int, seconds: float) -> float:
    """TFLOP/s of one ``size`` x ``size`` by ``size`` x ``size`` matmul in ``seconds``."""
    return 2 * size**3 / seconds / 1e12


def stream_ring(size_mib: int, ring_mib: int = STREAM_RING_MIB) -> tuple[int, int]:
    """(rows of each matrix, matrices in the ring) for the streaming test at ``size_mib``."""
    rows = max(1, (size_mib << 20) // (STREAM_HIDDEN * 2))
    return rows, max(2, -(-ring_mib // size_mib))


def _cuda_torch() -> Any:
    """torch, once it is known to see a CUDA device; else VerbFailed with the reason."""
    hint = (
        "run the gpu verb on a node with an NVIDIA GPU, its driver and a CUDA build of torch "
        "(nvidia-smi lists the GPU; CUDA_VISIBLE_DEVICES is not empty)"
    )
    try:
        import torch
    except ImportError:
        raise VerbFailed(
            f"no CUDA device visible to torch: torch does not import with {sys.executable}",
            hint=hint,
        ) from None
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise VerbFailed(
            f"no CUDA device visible to torch {torch.__version__} ({build}) in {sys.executable}",
            hint=hint,
        )
    return torch


def _best_seconds(torch: Any, fn: Any, *, reps: int, rounds: int) -> float:
    """Seconds per call of ``fn`` on the current device: the fastest of ``rounds`` timed runs of
    ``reps`` calls each, timed with CUDA events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    return best


def _graph(torch: Any, fn: Any) -> Any:
    """``fn`` captured as one CUDA graph (warmed up on a side stream first, as vLLM does)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _copy_seconds(torch: Any, device: Any, nbytes: int, rounds: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _best_seconds(torch, lambda: dst.copy_(src), reps=GPU_REPS, rounds=rounds)


def _matmul_seconds(torch: Any, device: Any, size: int, rounds: int) -> float:
    x = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    y = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(x)
    for _ in range(2):  # clocks up, cuBLAS picks its kernel
        torch.mm(x, y, out=out)
    return _best_seconds(torch, lambda: torch.mm(x, y, out=out), reps=GPU_REPS, rounds=rounds)


def _stream_gbs(torch: Any, device: Any, size_mib: int, ring_mib: int, rounds: int) -> float:
    rows, count = stream_ring(size_mib, ring_mib)
    token = torch.randn(1, STREAM_HIDDEN, dtype=torch.bfloat16, device=device)
    weights = [
        torch.randn(rows, STREAM_HIDDEN, dtype=torch.bfloat16, device=device) for _ in range(count)
    ]
    linear = torch.nn.functional.linear
    graph = _graph(torch, lambda: [linear(token, w) for w in weights])
    replay_s = _best_seconds(torch, graph.replay, reps=GPU_REPS, rounds=rounds)
    return count * rows * STREAM_HIDDEN * 2 / replay_s / 1e9


def _measure_gpu(torch: Any, index: int, req: GpuRequest) -> GpuDeviceMeasurement:
    started = time.perf_counter()
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device)
    free, total = torch.cuda.mem_get_info(device)
    budget = int(free * 0.8)  # the allocator and the graphs need some room besides the buffers
    copy_bytes = (min(2 * (req.copy_mib << 20), budget) // 2) >> 20 << 20
    if copy_bytes < 64 << 20:
        raise VerbFailed(
            f"CUDA device {index} ({name}) has {free >> 20} MiB free: too little to measure",
            hint="measure while nothing holds the GPU's memory (before the server starts)",
        )
    copy_s = _copy_seconds(torch, device, copy_bytes, req.repeats)
    size = req.matmul_size
    while 3 * size * size * 2 > budget and size > 256:
        size //= 2
    mm_s = _matmul_seconds(torch, device, size, req.repeats)
    ring_mib = min(STREAM_RING_MIB, (budget >> 20) // 2)
    stream = {}
    for size_mib in req.stream_mib:
        stream[size_mib] = _stream_gbs(torch, device, size_mib, ring_mib, req.repeats)
        torch.cuda.empty_cache()  # the ring and its graph's pool go before the next size
    return GpuDeviceMeasurement(
        index=index,
        name=name,
        memory_gib=total / 2**30,
        copy_gbs=copy_rate_gbs(copy_bytes, copy_s),
        copy_mib=copy_bytes >> 20,
        matmul_tflops=matmul_tflops(size, mm_s),
        matmul_size=size,
        stream_gbs=stream,
        seconds=time.perf_counter() - started,
    )


def gpu(req: GpuRequest) -> dict[str, Any]:
    """Measure each CUDA device's copy bandwidth, bf16 matmul and weight streaming (one device
    at a time, a couple of seconds each)."""
    started = time.perf_counter()
    torch = _cuda_torch()
    count = torch.cuda.device_count()
    indexes = list(range(count)) if req.devices is None else req.devices
    unseen = [i for i in indexes if not 0 <= i < count]
    if unseen:
        raise VerbFailed(
            f"CUDA device {unseen[0]} is not visible: torch sees {count} (0-{count - 1})",
            hint="name devices torch sees (CUDA_VISIBLE_DEVICES renumbers them from 0)",
        )
    devices = [_measure_gpu(torch, i, req) for i in indexes]
    return GpuMeasurement(
        devices=devices, torch=torch.__version__, seconds=time.perf_counter() - started
    ).model_dump()


# ------------------------------------------------------------------------------- link test


class ReceiveRequest(Request):
    """Listen on ``ip``:``port``, answer pings and count the bytes of ``streams`` connections."""

    ip: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    streams: int = Field(default=4, ge=1, le=64)
    wait_s: float = Field(default=30.0, gt=0, description="Give up when no sender comes.")


class SendRequest(Request):
    """Connect ``streams`` times to a receiver at ``host``:``port``, time ``pings`` round
    trips, then stream for ``seconds``."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    streams: int = Field(default=4, ge=1, le=64)
    seconds: float = Field(default=2.0, gt=0, le=60)
    pings: int = Field(default=50, ge=1, le=10000)
    connect_s: float = Field(default=15.0, gt=0, description="Retry connecting this long.")


def _serve_connection(conn: socket.socket, out: list[tuple[int, float]]) -> None:
    """Echo pings; count a bulk phase's bytes until the sender shuts down; reply with them."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        kind = conn.recv(1)
        if kind != _PING:
            break
        conn.sendall(_PING)
    if kind != _BULK:
        return  # the sender went away
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    count, start = 0, time.perf_counter()
    while got := conn.recv_into(view):
        count += got
    seconds = time.perf_counter() - start
    conn.sendall(_DONE.pack(count, seconds))
    out.append((count, seconds))


def receive(req: ReceiveRequest) -> dict[str, Any]:
    """Accept ``streams`` connections and report what each delivered."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((req.ip, req.port))
        except OSError as exc:
            raise VerbFailed(f"cannot listen on {req.ip}:{req.port}: {exc.strerror}") from None
        listener.listen(req.streams)
        listener.settimeout(req.wait_s)
        results: list[tuple[int, float]] = []
        workers = []
        for _ in range(req.streams):
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                raise VerbFailed(
                    f"no sender connected to {req.ip}:{req.port} within {req.wait_s:g} s"
                ) from None
            conn.settimeout(req.wait_s + 120)
            t = threading.Thread(target=_serve_connection, args=(conn, results), daemon=True)
            t.start()
            workers.append((t, conn))
        for t, conn in workers:
            t.join()
            conn.close()
    return {"connections": [{"bytes": b, "seconds": s} for b, s in results]}


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise VerbFailed(f"cannot connect to {host}:{port}: {exc}") from None
            time.sleep(0.1)
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            raise VerbFailed("the receiver closed the connection early")
        data += part
    return data


def send(req: SendRequest) -> dict[str, Any]:
    """Measure round trip and goodput to a receiver (both ends on the cluster's network)."""
    deadline = time.monotonic() + req.connect_s
    conns = [_connect(req.host, req.port, deadline)]
    rtts = []
    for _ in range(req.pings):
        start = time.perf_counter()
        conns[0].sendall(_PING)
        _recv_exact(conns[0], 1)
        rtts.append(time.perf_counter() - start)
    conns += [_connect(req.host, req.port, deadline) for _ in range(req.streams - 1)]
    payload = memoryview(bytes(CHUNK_BYTES))
    replies: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def stream(conn: socket.socket, until: float) -> None:
        try:
            conn.sendall(_BULK)
            while time.monotonic() < until:
                conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            replies.append(_DONE.unpack(_recv_exact(conn, _DONE.size)))
        except (OSError, VerbFailed) as exc:
            errors.append(exc)

    until = time.monotonic() + req.seconds
    threads = [threading.Thread(target=stream, args=(c, until)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    if errors:
        raise VerbFailed(f"streaming to {req.host}:{req.port} failed: {errors[0]}")
    total = sum(b for b, _ in replies)
    # Streams run side by side: the slowest one's time is the test's.
    seconds = max(s for _, s in replies)
    return {
        "dst_ip": req.host,
        "gbps": link_gbps(total, seconds),
        "rtt_ms": statistics.median(rtts) * 1e3,
        "streams": req.streams,
        "bytes": total,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------- controller side


def call(python: str, verb: str, request: Request) -> RemoteCall:
    """``python -m cluster.measure <verb>`` with ``request`` on stdin."""
    return RemoteCall(python, MODULE, verb, request)


VERBS: dict[str, Verb] = {
    "cpu": Verb(CpuRequest, cpu),
    "receive": Verb(ReceiveRequest, receive),
    "send": Verb(SendRequest, send),
    "gpu": Verb(GpuRequest, gpu),
}

if __name__ == "__main__":
    sys.exit(main(VERBS, prog=MODULE))
