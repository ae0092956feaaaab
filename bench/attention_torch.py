#!/usr/bin/env python3
"""PyTorch's attention at the GPU benchmark's shape, to set beside anneal's
(`attention_timing` in stages/tests/train_parity.rs; bench/device.sh runs
both in its `attention` part).

torch.nn.functional.scaled_dot_product_attention (what transformers uses by
default) on batch 4, 2,048 tokens, 14 query heads over 2 kv heads, head dim
64, bf16: forward, and forward plus backward, with `is_causal` (the flash
kernel) and with an explicit boolean mask. Median of RUNS calls after one
untimed call, each synchronised.

    python3 bench/attention_torch.py                 # CUDA, the benchmark's shape
    python3 bench/attention_torch.py --device cpu --small
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, runs, sync):
    fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="1 x 96 tokens, 6 heads over 2, f32")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    if args.small:
        b, kvh, rep, t, d, dtype = 1, 2, 3, 96, 16, torch.float32
    else:
        b, kvh, rep, t, d, dtype = 4, 2, 7, 2048, 64, torch.bfloat16
    h = kvh * rep
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(11)

    def rand(heads):
        return torch.randn(b, heads, t, d, device=dev, dtype=dtype, generator=g)

    q, k, v, dout = rand(h), rand(kvh), rand(kvh), rand(h)
    # True where a query may attend (SDPA's convention, the opposite of burn's).
    allowed = torch.ones(t, t, device=dev, dtype=torch.bool).tril()
    k_rep, v_rep = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def fwd_causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def fwd_mask():
        return F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed)

    def fwd_bwd(fwd):
        def run():
            for x in (q, k, v, k_rep, v_rep):
                x.grad = None
            fwd().backward(dout)

        return run

    want = fwd_mask().float()
    diff = (fwd_causal().float() - want).abs().max().item()
    for x in (q, k, v, k_rep, v_rep):
        x.requires_grad_(True)
    res = {
        "forward is_causal": median_ms(fwd_causal, args.runs, sync),
        "forward+backward is_causal": median_ms(fwd_bwd(fwd_causal), args.runs, sync),
        "forward mask": median_ms(fwd_mask, args.runs, sync),
        "forward+backward mask": median_ms(fwd_bwd(fwd_mask), args.runs, sync),
    }
    shape = f"b{b} h{h}/kv{kvh} t{t} d{d} {str(dtype).removeprefix('torch.')}"
    print(
        f"torch {torch.__version__} sdpa timing {shape}: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in res.items())
        + f"; is_causal vs mask max diff {diff:.3e}"
    )


if __name__ == "__main__":
    main()
