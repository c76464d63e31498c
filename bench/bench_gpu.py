"""GPU decode table: hfrewrite vs transformers' generate (eager and static cache) on real model shapes.

    python bench/bench_gpu.py --models llama-1b,llama-8b --batch-sizes 1,32 [--out DIR]

Real weights cannot travel to the GPU machine, so each shape gets random bf16 weights made on the device
(transformers' own init); hfrewrite compiles the same tensors (a state-dict weight provider, no file round
trip). Prints one markdown table per model last; writes everything as JSON under --out (or $OUT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hfrewrite.compiler.build import build_compiled
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.device import pick_device
from hfrewrite.runtime.benchmark import compare, format_table

SHAPES = {
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                                   tie_word_embeddings=True, rope_theta=100000.0)),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                               rope_theta=500000.0)),
    "llama-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                               rope_theta=500000.0)),
    "qwen3-30b-a3b-6l": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                           num_hidden_layers=6, num_attention_heads=32, num_key_value_heads=4,
                                           head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                                           norm_topk_prob=True, tie_word_embeddings=False)),
}


def state_dict_weights(model: torch.nn.Module):
    """hfrewrite's weight provider over the reference's own tensors (shared, not copied)."""
    state = model.state_dict()

    def provide(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype, **_: object) -> dict:
        return {name: state[name if name in state else tied[name]].to(device, dtype) for name in specs}
    return provide


def shape_reference(name: str, device: torch.device) -> tuple[AutoConfig, torch.nn.Module]:
    """(config, HF model in bf16 with seeded random weights made on `device`) of one of the SHAPES."""
    model_type, sizes = SHAPES[name]
    config = AutoConfig.for_model(model_type, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=2, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        return config, AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def bench_shape(name: str, batch_sizes: list[int], prompt_len: int, new_tokens: int, baselines: tuple[str, ...],
                device_graphs: bool) -> dict:
    device = pick_device(None)
    config, reference = shape_reference(name, device)
    options = CompileOptions(dtype="bfloat16", verify=False, progress=False, device_graphs=device_graphs)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, _ = build_compiled(config, state_dict_weights(reference), options, timings)
    compile_s = time.perf_counter() - start
    print(f"{name}: compiled in {compile_s:.1f} s {timings}", flush=True)
    report = compare(model, reference, batch_sizes, prompt_len, new_tokens, baselines,
                     progress=lambda line: print(f"  {name} {line}", flush=True))
    report.update({"model": f"{name} shape", "compile_s": round(compile_s, 1), "timings": timings,
                   "device_graphs": model.graph_reports(), "compiles": model.counter.frames})
    del model, reference
    if device.type != "cpu":
        torch.get_device_module(device).empty_cache()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-1b,llama-8b")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baselines", default="eager,static")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    reports = []
    for name in args.models.split(","):
        reports.append(bench_shape(name, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len,
                                   args.new_tokens, tuple(b for b in args.baselines.split(",") if b),
                                   not args.no_cuda_graphs))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gpu.json").write_text(json.dumps(reports, indent=2))
    device = pick_device(None)
    device = torch.get_device_module(device).get_device_name() if device.type != "cpu" else "cpu"
    print(f"\n{device}, torch {torch.__version__}; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    for report in reports:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
