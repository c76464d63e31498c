"""Linears over 1-8 rows on the GPU: cuBLAS (torch.nn.functional.linear) against the Triton GEMV kernel.

Every case is timed as 20 back-to-back calls replayed from a CUDA graph (what a decode step is), for the
real projection shapes of the llama-1b and llama-8b benchmarks, over a sweep of the kernel's tiles; prints
the best tile per shape, its time and bandwidth, and writes every measurement to $OUT/bench_gemv.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from hfrewrite.kernels.gemv.triton import GemvConfig, gemv, rows_padded

SHAPES = {  # (N, K) = weight [out, in]
    "1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
    "1b.lm_head": (128256, 2048), "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336), "8b.lm_head": (128256, 4096), "moe.router": (128, 2048)}
CALLS = 20


def graph_time_us(fn, device) -> float:
    module = torch.get_device_module(device)
    stream = module.Stream()
    stream.wait_stream(module.current_stream())
    with module.stream(stream):
        fn()
    module.current_stream().wait_stream(stream)
    graph = module.CUDAGraph()
    with module.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    module.synchronize()
    start, end = module.Event(enable_timing=True), module.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    module.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * CALLS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    device = torch.device(torch.accelerator.current_accelerator().type)
    results, table = [], []
    for name, m in itertools.product(args.shapes.split(","), [int(r) for r in args.rows.split(",")]):
        n, k = SHAPES[name]
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        want = F.linear(x.float(), weight.float())
        cublas = graph_time_us(lambda: F.linear(x, weight), device)
        best = None
        for block_n, block_k, warps in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8)):
            if rows_padded(m) * block_n * block_k > 32768 or block_k > triton_pow2(k):
                continue
            config = GemvConfig(block_n, block_k, warps)
            error = (gemv(x, weight, config=config).float() - want).abs().max().item()
            us = graph_time_us(lambda: gemv(x, weight, config=config), device)
            results.append({"shape": name, "m": m, "config": [block_n, block_k, warps], "us": us, "error": error})
            if best is None or us < best[0]:
                best = (us, config, error)
        gb = (n * k * 2) / 1e9
        row = {"shape": name, "m": m, "cublas_us": round(cublas, 2), "triton_us": round(best[0], 2),
               "cublas_tb_s": round(gb / cublas * 1e3, 2), "triton_tb_s": round(gb / best[0] * 1e3, 2),
               "best": [best[1].block_n, best[1].block_k, best[1].num_warps], "max_err": round(best[2], 4)}
        table.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gemv.json").write_text(json.dumps({"table": table, "all": results}, indent=1))
    print("| shape | M | cuBLAS us | Triton us | cuBLAS TB/s | Triton TB/s | best (BN, BK, warps) |")
    for row in table:
        print(f"| {row['shape']} | {row['m']} | {row['cublas_us']} | {row['triton_us']} | {row['cublas_tb_s']} | "
              f"{row['triton_tb_s']} | {row['best']} |")
    return 0


def triton_pow2(k: int) -> int:
    return 1 << (k - 1).bit_length()


if __name__ == "__main__":
    raise SystemExit(main())
