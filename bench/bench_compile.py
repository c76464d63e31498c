"""Compile time and decode speed of whole-graph against layer-wise compilation, side by side in one run.

    python bench/bench_compile.py [--model smollm2-135m] [--granularities graph,layer] [--batch-sizes 1,16]

Captures and rewrites the model once (no compile), then for each granularity compiles it (timed: the first
step compiles) and measures the median decode step, the granularities interleaved round by round so a
loaded machine slows them alike. Prints one row per granularity and batch, and ratios against the first.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hfrewrite.compiler.build import CompileOptions, build
from hfrewrite.compiler.sources import resolve
from hfrewrite.runtime.generation import Generator
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.runtime.sampling import SamplingParams


def decode_step_seconds(model: CompiledModel, batch: int, new_tokens: int) -> float:
    """Median seconds of a decode step (one token per sequence) over a greedy generation of `batch` prompts."""
    generator = Generator(model, None, CacheConfig(16, 10 * batch + 1), max_tokens_per_step=64 * batch)
    prompts = torch.randint(0, int(model.config.vocab_size), (batch, 64),
                            generator=torch.Generator().manual_seed(0)).tolist()
    forward, steps = model.forward, []

    def timed(step, *rest, **kwargs):
        start = time.perf_counter()
        out = forward(step, *rest, **kwargs)
        steps.append((step.input_ids.shape[-1], time.perf_counter() - start))
        return out

    model.forward = timed
    try:
        generator.generate_ids(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    finally:
        model.forward = forward
    return statistics.median(seconds for tokens, seconds in steps if tokens <= batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--granularities", default="graph,layer")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = build(resolve(args.model, progress=False), CompileOptions(verify=False, progress=False, backend=None)).model
    models: dict[str, CompiledModel] = {}
    compile_s: dict[str, float] = {}
    for granularity in args.granularities.split(","):
        start = time.perf_counter()
        model = CompiledModel(base.graph_module, base.kv_specs, base.config, base.device, base.dtype,
                              granularity=granularity)
        model.warmup()
        compile_s[granularity] = time.perf_counter() - start
        models[granularity] = model
        print(f"{granularity}: compile {compile_s[granularity]:.1f} s, {model.counter.frames} compilations", flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for granularity, model in models.items():  # the generator's cache (block size 16) is a new shape: compile it
        start = time.perf_counter()
        decode_step_seconds(model, 1, 2)
        print(f"{granularity}: first generation {time.perf_counter() - start:.1f} s, {model.counter.frames} "
              f"compilations", flush=True)
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in batches:
            for granularity, model in models.items():
                samples.setdefault((granularity, batch), []).append(decode_step_seconds(model, batch, args.new_tokens))
                print(f"  {granularity} batch {batch}: {samples[(granularity, batch)][-1] * 1000:.1f} ms/step, "
                      f"{model.counter.frames} compilations", flush=True)
    first = next(iter(models))
    print(f"| granularity | compile s | batch | decode tok/s | vs {first} |\n|---|---|---|---|---|")
    for batch in batches:
        for granularity in models:
            tok_s = batch / statistics.median(samples[(granularity, batch)])
            ratio = statistics.median(samples[(first, batch)]) / statistics.median(samples[(granularity, batch)])
            print(f"| {granularity} | {compile_s[granularity]:.1f} | {batch} | {tok_s:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
