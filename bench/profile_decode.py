"""Where a generation step's time goes: per-step forward times and a torch.profiler table (not a test).

    python bench/profile_decode.py --batch 1 [--dtype bfloat16] [--profile]

Builds smollm2-135m (no verification), warms up, then generates 64 tokens for `--batch` random 64-token
prompts and prints the prefill step's time, the median decode step and tokens/s; with --profile, a
torch.profiler table (self CPU time) of 8 more steps.
"""
from __future__ import annotations

import argparse
import time

import torch

from hfrewrite.runtime.generation import Generator
from hfrewrite.compiler.build import CompileOptions, build
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.compiler.sources import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    model = build(resolve(args.model, progress=False), CompileOptions(verify=False, progress=False,
                                                                      dtype=args.dtype)).model
    generator = Generator(model, None, CacheConfig(16, 10 * args.batch + 1), max_tokens_per_step=64 * args.batch)
    prompts = torch.randint(0, int(model.config.vocab_size), (args.batch, 64),
                            generator=torch.Generator().manual_seed(0)).tolist()
    generator.generate_ids(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))
    forward, steps = model.forward, []

    def timed(step, *rest, **kwargs):
        start = time.perf_counter()
        out = forward(step, *rest, **kwargs)
        steps.append((step.input_ids.shape[-1], time.perf_counter() - start))
        return out

    model.forward = timed
    start = time.perf_counter()
    generator.generate_ids(prompts, SamplingParams(max_new_tokens=64, ignore_eos=True))
    total = time.perf_counter() - start
    model.forward = forward
    decode = sorted(seconds for tokens, seconds in steps if tokens <= args.batch)
    prefill = [(tokens, round(seconds, 3)) for tokens, seconds in steps if tokens > args.batch]
    print(f"batch {args.batch}: {total:.2f} s, {args.batch * 64 / total:.1f} tok/s; prefill steps (tokens, s) "
          f"{prefill}; median decode step {decode[len(decode) // 2] * 1000:.1f} ms")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generator.generate_ids(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
