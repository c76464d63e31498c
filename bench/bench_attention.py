"""GPU micro-benchmark of the paged-attention op: the Triton kernels against the plain-torch reference
and against the bytes-moved floor (K/V bytes read / copy bandwidth).

    python bench/bench_attention.py [--bandwidth 4.3e12] [--quick]

Cases: decode at batch 1 and 32 over contexts 128..4096 and two prefill cases, with llama-8b-like
attention (32 query heads, 8 KV heads, head dim 128, bf16, cache blocks of 16). Times come from
triton.testing.do_bench (eager launches, host overhead included) and, where the device can capture
graphs, do_bench_cudagraph (kernel time without launch overhead). Writes bench_attention.json to $OUT
when OUT is set. Non-interactive; about a minute on an H200.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from hfrewrite.device import device_name, pick_device
from hfrewrite.kernels.attention import op
from hfrewrite.kernels.attention import triton as triton_attention
from hfrewrite.runtime.step import Chunk, pack

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def make_case(device: torch.device, spans: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0) -> dict:
    """Random q/k/v and a cache whose blocks are handed out shuffled; spans are (cached context, queries)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(context + count) // BLOCK) for context, count in spans]
    order = torch.randperm(sum(need), generator=gen).tolist()
    chunks, cursor = [], 0
    for (context, count), blocks in zip(spans, need):
        chunks.append(Chunk([1] * count, context, order[cursor:cursor + blocks]))
        cursor += blocks
    step = pack(chunks, BLOCK, device)
    tokens = sum(count for _, count in spans)
    slots = sum(need) * BLOCK
    return {"step": step, "q": torch.randn(1, HEADS, tokens, HEAD_DIM, device=device, dtype=dtype),
            "k": torch.randn(1, KV_HEADS, tokens, HEAD_DIM, device=device, dtype=dtype),
            "v": torch.randn(1, KV_HEADS, tokens, HEAD_DIM, device=device, dtype=dtype),
            "k_cache": torch.randn(slots, KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
            "v_cache": torch.randn(slots, KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
            "kv_bytes": sum(c + n for c, n in spans) * KV_HEADS * HEAD_DIM * 2 * torch.finfo(dtype).bits // 8}


def run_op(case: dict, use_triton: bool) -> torch.Tensor:
    md = case["step"].metadata
    args = (case["q"], case["k"], case["v"], case["k_cache"], case["v_cache"])
    if use_triton:
        op.write_cache(case["k"], case["v"], case["k_cache"], case["v_cache"], md.slot_mapping)
        return triton_attention.paged_attention_triton(case["q"], case["k_cache"], case["v_cache"], md.block_tables,
                                                       md.seq_lens, md.query_start_loc, md.block_size,
                                                       HEAD_DIM ** -0.5, 0, 0.0, True, None)
    return op.paged_attention_reference(*args, md, HEAD_DIM ** -0.5, 0, 0.0, True, None)


def bench(device: torch.device, bandwidth: float, quick: bool) -> list[dict]:
    import triton.testing

    graphs = hasattr(torch.get_device_module(device), "CUDAGraph") and hasattr(triton.testing, "do_bench_cudagraph")
    contexts = [128, 1024, 4096] if quick else [128, 512, 1024, 2048, 4096]
    cases = [(f"decode b{batch} ctx{ctx}", [(ctx - 1, 1)] * batch) for batch in (1, 32) for ctx in contexts]
    cases += [("prefill 1x2048", [(0, 2048)]), ("mixed 4x512 + 28 decode ctx1024", [(0, 512)] * 4 + [(1023, 1)] * 28)]
    rows = []
    for name, spans in cases:
        case = make_case(device, spans, torch.bfloat16)
        ours, theirs = run_op(case, True), run_op(case, False)
        error = (ours.float() - theirs.float()).abs().max().item()
        triton_us = triton.testing.do_bench(lambda: run_op(case, True), warmup=10, rep=50) * 1e3
        graph_us = (triton.testing.do_bench_cudagraph(lambda: run_op(case, True), rep=50) * 1e3) if graphs else None
        reference_us = triton.testing.do_bench(lambda: run_op(case, False), warmup=3, rep=30) * 1e3
        floor_us = case["kv_bytes"] / bandwidth * 1e6
        rows.append({"case": name, "triton_us": triton_us, "triton_graph_us": graph_us, "reference_us": reference_us,
                     "floor_us": floor_us, "kv_mb": case["kv_bytes"] / 1e6, "max_abs_error": error})
        del case
        torch.get_device_module(device).empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the floor (H200: 4.3e12)")
    parser.add_argument("--quick", action="store_true", help="fewer contexts")
    args = parser.parse_args(argv)
    device = pick_device()
    if device.type == "cpu" or not triton_attention.available() or op.interpreting():
        print("bench_attention: needs an accelerator with triton (TRITON_INTERPRET unset); nothing to do")
        return 0
    rows = bench(device, args.bandwidth, args.quick)
    print(f"device: {device_name(device)}  heads {HEADS}/{KV_HEADS} x {HEAD_DIM}, bf16, block {BLOCK}, "
          f"floor at {args.bandwidth / 1e12:.2f} TB/s")
    header = f"{'case':<34}{'KV MB':>8}{'triton us':>11}{'graph us':>10}{'ref us':>10}{'floor us':>10}" \
             f"{'floor/graph':>12}{'max err':>9}"
    print(header)
    for row in rows:
        graph = row["triton_graph_us"]
        best = graph if graph is not None else row["triton_us"]
        print(f"{row['case']:<34}{row['kv_mb']:>8.1f}{row['triton_us']:>11.1f}"
              f"{graph if graph is not None else float('nan'):>10.1f}{row['reference_us']:>10.1f}"
              f"{row['floor_us']:>10.1f}{row['floor_us'] / best:>12.0%}{row['max_abs_error']:>9.4f}")
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "bench_attention.json"
        path.write_text(json.dumps({"device": device_name(device), "bandwidth": args.bandwidth, "rows": rows},
                                   indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
