"""Measure Llama-shaped decode and prefill step times on one GPU with plain torch + CUDA graphs.

A stand-in for a well-run engine (vLLM uses CUDA graphs for decode): random bf16 weights in the
exact shapes of a Llama config, KV cache of a given context, one graph replay per step. The
figures calibrate `llamacluster plan`'s speed model against real hardware.

Usage: python3 llama_step.py OUT.json
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    # name: hidden, intermediate, layers, q heads, kv heads, head dim, vocab
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256),
    "llama-7b": (4096, 11008, 32, 32, 32, 128, 32000),
    "llama-3.1-70b": (8192, 28672, 80, 64, 8, 128, 128256),
}


class Model:
    def __init__(self, shape, layers, batch, ctx, dev):
        h, inter, _, nq, nkv, hd, vocab = shape
        self.nq, self.nkv, self.hd = nq, nkv, hd
        g = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16) * 0.02  # noqa: E731
        self.layers = []
        for _ in range(layers):
            self.layers.append(
                dict(
                    qkv=g((nq + 2 * nkv) * hd, h),
                    o=g(h, nq * hd),
                    gu=g(2 * inter, h),
                    d=g(h, inter),
                    n1=torch.ones(h, device=dev, dtype=torch.bfloat16),
                    n2=torch.ones(h, device=dev, dtype=torch.bfloat16),
                    k=g(batch, nkv, ctx + 1, hd),
                    v=g(batch, nkv, ctx + 1, hd),
                )
            )
        self.head = g(vocab, h)
        self.embed = g(vocab, h)
        self.weight_bytes = (
            sum(t.numel() * 2 for lay in self.layers for n, t in lay.items() if n not in ("k", "v"))
            + 2 * self.head.numel() // 1
        )  # lm_head read; embedding is a gather
        self.kv_bytes = sum(lay["k"].numel() * 2 * 2 for lay in self.layers)

    def decode(self, x):  # x: [B, 1, h]
        B = x.shape[0]
        for lay in self.layers:
            r = x
            x = F.rms_norm(x, (x.shape[-1],), lay["n1"])
            qkv = F.linear(x, lay["qkv"])
            q, k, v = qkv.split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
            q = q.view(B, 1, self.nq, self.hd).transpose(1, 2)
            lay["k"][:, :, -1:] = k.view(B, 1, self.nkv, self.hd).transpose(1, 2)
            lay["v"][:, :, -1:] = v.view(B, 1, self.nkv, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, lay["k"], lay["v"], enable_gqa=True)
            x = r + F.linear(a.transpose(1, 2).reshape(B, 1, -1), lay["o"])
            r = x
            x = F.rms_norm(x, (x.shape[-1],), lay["n2"])
            gu = F.linear(x, lay["gu"])
            gate, up = gu.chunk(2, -1)
            x = r + F.linear(F.silu(gate) * up, lay["d"])
        return F.linear(x, self.head)

    def prefill(self, x):  # x: [1, T, h], causal attention over T
        B, T, _ = x.shape
        for lay in self.layers:
            r = x
            x = F.rms_norm(x, (x.shape[-1],), lay["n1"])
            qkv = F.linear(x, lay["qkv"])
            q, k, v = qkv.split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
            q = q.view(B, T, self.nq, self.hd).transpose(1, 2)
            k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)
            v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = r + F.linear(a.transpose(1, 2).reshape(B, T, -1), lay["o"])
            r = x
            x = F.rms_norm(x, (x.shape[-1],), lay["n2"])
            gate, up = F.linear(x, lay["gu"]).chunk(2, -1)
            x = r + F.linear(F.silu(gate) * up, lay["d"])
        return F.linear(x[:, -1:], self.head)


def timed_graph(fn, x, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(reps):
        g.replay()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) / reps


def copy_tb_s(dev):
    """The device's copy bandwidth ceiling: two 2 GiB buffers, bytes read + written, TB/s."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    b.copy_(a)
    st.record()
    for _ in range(10):
        b.copy_(a)
    en.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (st.elapsed_time(en) / 1e3) / 1e12


def main(out):
    dev = "cuda"
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    t0 = time.time()
    res["copy_tb_s"] = copy_tb_s(dev)
    plans = [
        ("llama-7b", 32, [(1, 512)], [512]),
        ("llama-3.1-8b", 32, [(1, 512), (8, 512), (32, 512), (128, 512), (256, 1024)], [512, 2048]),
        ("llama-3.1-70b", 40, [(1, 512), (32, 512)], [512]),  # 40 of 80 layers, scaled below
    ]
    for name, layers, decodes, prefills in plans:
        try:
            run_plan(res, name, layers, decodes, prefills, dev)
        except Exception as exc:  # keep the other rows
            print(f"{name}: {exc!r}", flush=True)
            res["rows"].append(dict(model=name, error=repr(exc)))
        torch.cuda.empty_cache()
    res["seconds"] = time.time() - t0
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def run_plan(res, name, layers, decodes, prefills, dev):
    if True:
        shape = SHAPES[name]
        scale = shape[2] / layers
        for batch, ctx in decodes:
            m = Model(shape, layers, batch, ctx, dev)
            x = torch.randn(batch, 1, shape[0], device=dev, dtype=torch.bfloat16)
            ms = timed_graph(m.decode, x)
            wb = m.weight_bytes - 2 * m.head.numel()
            full_ms = (ms - 0) * 1  # measured on `layers` layers
            row = dict(
                model=name,
                kind="decode",
                batch=batch,
                ctx=ctx,
                layers_run=layers,
                ms_measured=ms,
                weight_gb=(wb * scale + 2 * m.head.numel()) / 1e9,
                kv_gb=m.kv_bytes * scale / 1e9,
            )
            # scale the per-layer part to the full depth (lm_head counted once)
            head_ms = m.head.numel() * 2 / (res["copy_tb_s"] * 1e12) * 1e3
            row["ms_full_model"] = (full_ms - head_ms) * scale + head_ms
            row["achieved_tb_s"] = (row["weight_gb"] + row["kv_gb"]) / row["ms_full_model"]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            del m, x
            torch.cuda.empty_cache()
        for T in prefills:
            m = Model(shape, layers, 1, 1, dev)
            x = torch.randn(1, T, shape[0], device=dev, dtype=torch.bfloat16)
            ms = timed_graph(m.prefill, x, reps=20)
            flops = 2 * (m.weight_bytes / 2 - m.head.numel()) * T * scale + 2 * m.head.numel()
            row = dict(
                model=name,
                kind="prefill",
                tokens=T,
                layers_run=layers,
                ms_measured=ms,
                ms_full_model=ms * scale,
                tflops=flops / (ms * scale / 1e3) / 1e12,
            )
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            del m, x
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
