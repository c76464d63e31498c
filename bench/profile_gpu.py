"""Where a GPU decode step's time goes: host work per part of the step, the device time of one replayed graph,
and torch.profiler tables (not a test; one device call).

    python bench/profile_gpu.py --model llama-1b --batch-sizes 1,32 [--baselines eager,static] [--out DIR]

Builds the shape with random bf16 weights (as bench_gpu.py does), then per batch size: decode tok/s of a full
generate, the device time of the decode bucket's CUDA graph replayed back to back (the step's device floor),
the host time of each part of a step (prepare = pack or stage the inputs, run = launch, sample = argmax and
the copy of the tokens, which waits for the device), and a profiler table of a few steps. With --baselines,
the bench_gpu.py comparison on the same compiled model last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config  # noqa: E402  (--inductor)

sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu  # noqa: E402
from bench_gpu import shape_reference, state_dict_weights  # noqa: E402

from hfrewrite.compiler.build import build_compiled  # noqa: E402
from hfrewrite.compiler.options import CompileOptions  # noqa: E402
from hfrewrite.device import pick_device  # noqa: E402
from hfrewrite.runtime.benchmark import compare, format_table  # noqa: E402
from hfrewrite.runtime.generation import Generator  # noqa: E402
from hfrewrite.runtime.kv_cache import CacheConfig  # noqa: E402
from hfrewrite.runtime.runner import DeviceGraphRunner, bucket_for  # noqa: E402
from hfrewrite.runtime.sampling import SamplingParams  # noqa: E402


def timed(parts: dict[str, float], name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] += time.perf_counter() - start
    return wrapper


def profile_batch(generator: Generator, model, batch: int, prompt_len: int, new_tokens: int, out: Path) -> dict:
    device = model.device
    module = torch.get_device_module(device)
    prompts = torch.randint(0, int(model.config.vocab_size), (batch, prompt_len),
                            generator=torch.Generator().manual_seed(batch)).tolist()
    params = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)  # noqa: E731
    generator.generate_ids(prompts, params(2))
    module.synchronize()

    def timed_run(n: int) -> float:
        start = time.perf_counter()
        generator.generate_ids(prompts, params(n))
        module.synchronize()
        return time.perf_counter() - start

    engine = generator.engine
    lookahead = engine.lookahead
    engine.lookahead = False   # the host's reading waits for each step: lookahead's gain, side by side
    prefill, plain = timed_run(1), timed_run(new_tokens)
    engine.lookahead = lookahead
    full = timed_run(new_tokens)
    step_ms = (full - prefill) / (new_tokens - 1) * 1000
    row = {"batch": batch, "decode_tok_s": round(batch * (new_tokens - 1) / (full - prefill), 1),
           "step_ms": round(step_ms, 3), "prefill_ms": round(prefill * 1000, 2), "lookahead": lookahead,
           "decode_tok_s_no_lookahead": round(batch * (new_tokens - 1) / (plain - prefill), 1)}
    runner = generator.engine.executor.forward
    if isinstance(runner, DeviceGraphRunner) and bucket_for(batch, runner.graphs) is not None:
        graph = runner.graphs[bucket_for(batch, runner.graphs)].graph
        graph.replay()
        module.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            graph.replay()
        module.synchronize()
        row["graph_replay_ms"] = round((time.perf_counter() - start) / 50 * 1000, 3)
    parts: dict[str, float] = defaultdict(float)
    saved = engine.prepare, engine.executor.forward, engine._draw, engine._read, engine._event
    engine.prepare = timed(parts, "prepare", engine.prepare)
    engine.executor.forward = timed(parts, "run", engine.executor.forward)
    engine._draw = timed(parts, "sample", engine._draw)
    engine._read = timed(parts, "wait", engine._read)
    engine._event = timed(parts, "events", engine._event)
    steps_before = engine.steps
    start = time.perf_counter()
    generator.generate_ids(prompts, params(new_tokens))
    module.synchronize()
    total = time.perf_counter() - start
    steps = engine.steps - steps_before
    engine.prepare, engine.executor.forward, engine._draw, engine._read, engine._event = saved
    row["host_us_per_step"] = {k: round(v / steps * 1e6, 1) for k, v in sorted(parts.items())}
    row["host_us_per_step"]["other"] = round((total - sum(parts.values())) / steps * 1e6, 1)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    steps_before = engine.steps
    with profile(activities=activities) as prof:
        generator.generate_ids(prompts, params(8))
        module.synchronize()
    profiled = engine.steps - steps_before   # one prefill step and 7 decode steps
    averages = prof.key_averages()
    text = ["# by device time", averages.table(sort_by="self_device_time_total", row_limit=30),
            "# by host time", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    (out / f"profile_b{batch}.txt").write_text("\n".join(text))
    kernels = sorted(((e.key, e.self_device_time_total, e.count) for e in averages if e.self_device_time_total > 0),
                     key=lambda k: -k[1])
    # (kernel, us per call, calls per step); the decode kernels' counts are layers x 7 decode steps
    row["top_kernels"] = [(k[:60], round(t / c, 2), round(c / profiled, 1)) for k, t, c in kernels[:12]]
    row["device_us_per_step"] = round(sum(t for _, t, _ in kernels) / profiled, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baselines", default="")
    parser.add_argument("--compile-granularity", choices=("auto", "graph", "layer"), default="auto")
    parser.add_argument("--layers", type=int, default=0, help="cut the shape to this many layers (0: all)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set a torch._inductor.config option for this run (repeatable; experiments)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        setattr(torch._inductor.config, key, json.loads(value))
    if args.layers:
        model_type, sizes = bench_gpu.SHAPES[args.model]
        bench_gpu.SHAPES[args.model] = (model_type, {**sizes, "num_hidden_layers": args.layers})
    device = pick_device(None)
    config, reference = shape_reference(args.model, device)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, _ = build_compiled(config, state_dict_weights(reference),
                              CompileOptions(dtype="bfloat16", verify=False, progress=False,
                                             granularity=args.compile_granularity), timings)
    compile_s = round(time.perf_counter() - start, 1)
    print(f"{args.model}: compiled in {compile_s} s {timings}", flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    block = 16
    cache = CacheConfig(block, -(-(args.prompt_len + args.new_tokens) // block) * max(batches) + 1)
    generator = Generator(model, None, cache, max_tokens_per_step=max(512, args.prompt_len * max(batches)))
    rows = []
    for batch in batches:
        rows.append(profile_batch(generator, model, batch, args.prompt_len, args.new_tokens, args.out))
        print(json.dumps(rows[-1]), flush=True)
    report = {"model": args.model, "compile_s": compile_s, "timings": timings, "rows": rows,
              "graphs": model.graph_reports()}
    if args.baselines:
        report["compare"] = compare(model, reference, batches, args.prompt_len, args.new_tokens,
                                    tuple(args.baselines.split(",")),
                                    progress=lambda line: print(f"  {line}", flush=True))
        report["compare"].update({"model": f"{args.model} shape", "compile_s": compile_s})
    (args.out / "profile_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"graphs: {json.dumps(model.graph_reports())}; compilations: {model.counter.frames}")
    print(f"\n{torch.get_device_module(device).get_device_name()}, torch {torch.__version__}")
    print("| batch | decode tok/s | without lookahead | step ms | graph replay ms | host us/step (prepare, run, "
          "sample, wait, events, other) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        host = row["host_us_per_step"]
        print(f"| {row['batch']} | {row['decode_tok_s']} | {row['decode_tok_s_no_lookahead']} | {row['step_ms']} | "
              f"{row.get('graph_replay_ms', '-')} | "
              + ", ".join(str(host.get(k, '-')) for k in ("prepare", "run", "sample", "wait", "events", "other"))
              + " |")
    if "compare" in report:
        print(format_table(report["compare"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
