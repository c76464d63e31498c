"""GPU benchmark of `hfrewrite::fused_moe` against transformers' own `grouped_mm` and `batched_mm` experts.

Shapes: Qwen3-30B-A3B's experts (E=128, top-8, H=2048, I=768) and Mixtral-8x7B's (E=8, top-2, H=4096, I=14336),
bf16, M tokens in {1, 8, 64, 512, 4096}. Each time is the median of --reps launches timed with device events
after --warmup untimed ones (our first call autotunes), with L2 flushed before each launch; every implementation
is timed eager (host launch overhead included) and replayed from a CUDA graph (GPU time alone, as a captured
decode step sees it). `bw` = (bytes of the distinct experts hit, both matrices) / measured copy bandwidth / our
time: the share of the memory-bound ideal we reach, meaningful while M is small. Not a test; run on one GPU:

    python bench/bench_moe.py --out moe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from hfrewrite.kernels.moe.op import experts_forward
from hfrewrite.kernels.moe.autotune import DEFAULT_TUNER

SHAPES = {  # name -> (experts class, config, routing-weight dtype its router returns)
    "qwen3-30b-a3b": (Qwen3MoeExperts, lambda: Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768,
                                                              num_experts=128, num_experts_per_tok=8), torch.bfloat16),
    "mixtral-8x7b": (MixtralExperts, lambda: MixtralConfig(hidden_size=4096, intermediate_size=14336,
                                                           num_local_experts=8, num_experts_per_tok=2), torch.float32),
}
BATCHED_MM_LIMIT = 16 << 30  # batched_mm gathers one weight copy per (token, k): skip past this many bytes


def time_ms(fn: Callable[[], object], warmup: int, reps: int, flush: torch.Tensor) -> float:
    """Median of `reps` event-timed calls, each after an L2 flush (weights must come from HBM, as in a model)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.Event(enable_timing=True), torch.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (what a decode loop would replay): launch overhead out, GPU time left."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: torch.device, flush: torch.Tensor) -> float:
    """Bytes per ms of a large device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 3, 10, flush)
    return 2 * src.numel() / ms


def route(tokens: int, experts: int, top_k: int, dtype: torch.dtype, device: torch.device,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random router: softmax over random logits, top-k, renormalised (Mixtral / Qwen3 style)."""
    logits = torch.randn(tokens, experts, device=device, generator=gen)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(dtype)


def bench_shape(name: str, tokens_list: list[int], args: argparse.Namespace, device: torch.device,
                bandwidth: float, flush: torch.Tensor) -> list[dict]:
    """One model's experts with random weights, every M: timings, ratios and our error against grouped_mm."""
    cls, make_config, weight_dtype = SHAPES[name]
    config = make_config()
    with torch.device(device):
        module = cls(config).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.02, generator=gen)
    experts, hid, inter = module.gate_up_proj.shape[0], module.gate_up_proj.shape[2], module.down_proj.shape[2]
    top_k = config.num_experts_per_tok
    expert_bytes = 3 * inter * hid * module.gate_up_proj.element_size()
    rows = []
    for tokens in tokens_list:
        hidden = torch.randn(tokens, hid, device=device, generator=gen).to(torch.bfloat16)
        ids, weights = route(tokens, experts, top_k, weight_dtype, device, gen)
        hit = int(torch.unique(ids).numel())
        row = dict(shape=name, tokens=tokens, experts=experts, top_k=top_k, hidden=hid, inter=inter, experts_hit=hit)
        with torch.no_grad():
            begin = time.perf_counter()  # the first call autotunes this M bucket
            ours = experts_forward(module, hidden, ids, weights)
            torch.accelerator.synchronize()
            row["first_call_s"] = time.perf_counter() - begin
            impls = {"ours": lambda: experts_forward(module, hidden, ids, weights),
                     "grouped_mm": lambda: module(hidden, ids, weights),
                     "batched_mm": lambda: module(hidden, ids, weights)}
            for impl, fn in impls.items():
                if impl == "batched_mm" and tokens * top_k * expert_bytes > BATCHED_MM_LIMIT:
                    row[f"{impl}_ms"] = row[f"{impl}_graph_ms"] = None
                    continue
                if impl != "ours":
                    config._experts_implementation = impl
                if impl == "grouped_mm":
                    theirs = fn()
                    row["rel_err_vs_grouped_mm"] = ((ours.float() - theirs.float()).abs().max()
                                                    / theirs.float().abs().max()).item()
                row[f"{impl}_ms"] = time_ms(fn, args.warmup, args.reps, flush)
                row[f"{impl}_graph_ms"] = time_ms(graphed(fn), args.warmup, args.reps, flush)
        for impl in ("grouped_mm", "batched_mm"):
            for mode in ("", "_graph"):
                base = row[f"{impl}{mode}_ms"]
                row[f"speedup{mode}_vs_{impl}"] = None if base is None else base / row[f"ours{mode}_ms"]
        row["bw_frac"] = hit * expert_bytes / bandwidth / row["ours_ms"]
        row["bw_frac_graph"] = hit * expert_bytes / bandwidth / row["ours_graph_ms"]
        row["tflops_graph"] = 2 * tokens * top_k * 3 * inter * hid / row["ours_graph_ms"] / 1e9
        chosen = [cfg for key, cfg in DEFAULT_TUNER.best.items() if key[1:5] == (experts, hid, inter, top_k)
                  and key[0] >= tokens and key[0] < 2 * tokens]
        row["config"] = repr(chosen[0]) if chosen else None
        rows.append(row)
        print_row(row)
    return rows


def bench_splits(name: str, tokens_list: list[int], ranks: int, args: argparse.Namespace, device: torch.device,
                 flush: torch.Tensor) -> list[dict]:
    """Rank 0's experts time under --tp `ranks`: each expert's width split (the default) and whole experts split
    (--ep, global router ids, the kernel dropping the other ranks' slots), against the whole layer on one GPU.
    CUDA-graph times (GPU work alone); the all-reduce after either split is not included."""
    from hfrewrite.kernels.moe.op import fused_moe_triton
    from hfrewrite.kernels.moe.reference import Activation, ExpertsLayout

    _, make_config, weight_dtype = SHAPES[name]
    config = make_config()
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    hid, top_k = config.hidden_size, config.num_experts_per_tok
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(experts, 2 * inter, hid, device=device, generator=gen).to(torch.bfloat16) * 0.02
    down = torch.randn(experts, hid, inter, device=device, generator=gen).to(torch.bfloat16) * 0.02
    width = inter // ranks
    tp_gate_up = torch.cat([gate_up[:, :width], gate_up[:, inter:inter + width]], 1).contiguous()
    tp_down = down[:, :, :width].contiguous()
    local = experts // ranks
    ep_gate_up, ep_down = gate_up[:local].contiguous(), down[:local].contiguous()
    layout, act = ExpertsLayout(), Activation()
    rows = []
    for tokens in tokens_list:
        hidden = torch.randn(tokens, hid, device=device, generator=gen).to(torch.bfloat16)
        ids, weights = route(tokens, experts, top_k, weight_dtype, device, gen)
        calls = {"whole": lambda: fused_moe_triton(hidden, ids, weights, gate_up, down, layout, act),
                 "tp_width": lambda: fused_moe_triton(hidden, ids, weights, tp_gate_up, tp_down, layout, act),
                 "ep": lambda: fused_moe_triton(hidden, ids, weights, ep_gate_up, ep_down, layout, act,
                                                expert_parallel=True)}
        row = dict(shape=name, tokens=tokens, ranks=ranks,
                   rank0_slots_ep=int(((ids >= 0) & (ids < local)).sum()), slots=tokens * top_k)
        with torch.no_grad():
            for label, fn in calls.items():
                fn()  # autotune this shape first
                row[f"{label}_graph_ms"] = time_ms(graphed(fn), args.warmup, args.reps, flush)
        for label in ("tp_width", "ep"):
            row[f"{label}_share"] = row[f"{label}_graph_ms"] / row["whole_graph_ms"]
        print(f"{name:>14} {tokens:>5} tp{ranks} whole {row['whole_graph_ms']:.4f} ms | width split "
              f"{row['tp_width_graph_ms']:.4f} ms ({row['tp_width_share']:.2f}) | ep {row['ep_graph_ms']:.4f} ms "
              f"({row['ep_share']:.2f}, {row['rank0_slots_ep']}/{row['slots']} slots)", flush=True)
        rows.append(row)
    return rows


def fmt(value: float | None, spec: str) -> str:
    """A number, or '-' where an implementation was skipped."""
    return "-" if value is None else format(value, spec)


def print_row(row: dict) -> None:
    """One table line per (shape, M), printed as soon as it is measured."""
    times = " ".join(fmt(row[f"{impl}{mode}_ms"], ">9.4f") for mode in ("", "_graph")
                     for impl in ("ours", "grouped_mm", "batched_mm"))
    ratios = " ".join(fmt(row[f"speedup{mode}_vs_{impl}"], ">6.2f") for mode in ("", "_graph")
                      for impl in ("grouped_mm", "batched_mm"))
    print(f"{row['shape']:>14} {row['tokens']:>5} {row['experts_hit']:>4} {times} {ratios} {row['bw_frac']:>5.2f} "
          f"{row['bw_frac_graph']:>5.2f} {row['tflops_graph']:>6.1f} {fmt(row.get('rel_err_vs_grouped_mm'), '>7.1e')} "
          f"{row['first_call_s']:>5.1f}  {row['config']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON rows")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=[1, 8, 64, 512, 4096])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--splits", type=int, default=0, metavar="N",
                        help="instead: rank 0's share of the experts time under --tp N, width split vs --ep")
    args = parser.parse_args()
    if not torch.accelerator.is_available():
        raise SystemExit("bench_moe needs a GPU")
    device = torch.accelerator.current_accelerator()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    if args.splits > 1:
        rows = [row for name in args.shapes for row in bench_splits(name, args.tokens, args.splits, args, device,
                                                                    flush)]
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)
        return
    bandwidth = copy_bandwidth(device, flush)
    print(f"copy bandwidth {bandwidth / 1e6:.0f} GB/s on {torch.cuda.get_device_name(device)}")
    print("times in ms, eager then CUDA graph; x_* = their time / ours; bw = bandwidth-bound time / ours")
    heads = ["ours", "grouped", "batched", "g_ours", "g_grouped", "g_batched"]
    print(f"{'shape':>14} {'M':>5} {'hit':>4} " + " ".join(f"{h:>9}" for h in heads) + " "
          + " ".join(f"{h:>6}" for h in ["x_grp", "x_bat", "gx_grp", "gx_bat"])
          + f" {'bw':>5} {'g_bw':>5} {'TFLOPs':>6} {'rel_err':>7} {'tune':>5}  config")
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, args.tokens, args, device, bandwidth, flush)
        torch.accelerator.empty_cache()  # the last model's weights and graph pools are gone by now
    with open(args.out, "w") as handle:
        json.dump(dict(device=torch.cuda.get_device_name(device), copy_bandwidth_gbs=bandwidth / 1e6, rows=rows),
                  handle, indent=1)


if __name__ == "__main__":
    main()
