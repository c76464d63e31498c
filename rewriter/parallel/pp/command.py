"""`hfrewrite compile|generate|bench MODEL --pp N` on its launched ranks, and the check made before launching.

Every rank builds only its own stage (the one build, hfrewrite.compiler.build, whose placement step
is parallel/pp/build.py). The later stages serve until the driver stops them; the ranks of stage 0 run the command itself, the CLI's own `cmd_compile` and
`cmd_generate` on a CompileResult made here, so a pipelined command prints what the one-device
command prints. Only two things differ on a pipeline: what the tp ranks of stage 0 must agree on
(the verification, a sampling seed) is broadcast in their own tp group, since the serving ranks take
part in no collective; and generation keeps one micro-batch per stage in flight.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from hfrewrite.runtime.generation import Generator
from hfrewrite.compiler.build import build, reference_model
from hfrewrite.compiler.options import CompileOptions, CompileResult, timed
from hfrewrite.parallel.pp.ring import PipelineClient, PipelineServer
from hfrewrite.runtime.engine import Engine
from hfrewrite.compiler.sources import resolve

Command = Callable[[argparse.Namespace, CompileResult], int]


@dataclass
class PipelinedGenerator(Generator):
    """Generator over a PipelineClient with micro-batches in flight (one per stage unless told)."""

    micro_batches: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        client = self.model
        if not isinstance(client, PipelineClient):
            raise TypeError(f"PipelinedGenerator drives a PipelineClient, got {type(client).__name__}")
        engine = self.engine
        self.engine = Engine(client, self.cache_config, client.device, client.max_context, sorted(engine.eos_ids),
                             engine.decode, self.max_tokens_per_step, self.micro_batches or len(client.split.stages))


def check_stage_counts(model_id: str, stages: int, counts: Sequence[int], progress: bool = False) -> None:
    """Refuse a split the config already rules out (more stages than layers, counts that do not add up)
    before any rank starts; the ranks check the graph itself again."""
    from hfrewrite.parallel.plans import text_config
    from hfrewrite.parallel.pp.split import layer_counts

    config = resolve(model_id, progress=progress).config
    layers = getattr(text_config(config), "num_hidden_layers", None)
    if isinstance(layers, int):
        layer_counts(layers, stages, counts or None)


def run_stage(args: argparse.Namespace, options: CompileOptions, command: Command) -> int:
    """One launched rank of a --pp command: build this rank's stage (the one build, which joins the ranks), then
    serve it or drive `command` on it."""
    source = resolve(args.model, progress=options.progress)
    result = build(source, replace(options, verify=False))  # stage 0's tp ranks verify below
    model = result.model
    if isinstance(model, PipelineServer):
        return model.serve()
    assert isinstance(model, PipelineClient)
    layout = model.layout
    code = 2
    try:
        if options.verify:
            from hfrewrite.compiler.verify import verify

            with timed(result.timings, "verify"):
                reference = reference_model(source, model.device, model.dtype, progress=options.progress) \
                    if layout.rank == 0 else None
                result.verification = layout.agree(verify(model, reference, seed=options.verify_seed))
        if getattr(args, "seed", 0) is None and layout.tp > 1:  # the tp ranks of stage 0 sample the same tokens
            args.seed = layout.agree(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        code = command(args, result)
    finally:
        model.close(code)
    return code


def bench_stages(args: argparse.Namespace, result: CompileResult) -> int:
    """Micro-batched generation throughput of the pipeline (hfrewrite alone: its weights are on every stage)."""
    from hfrewrite.runtime.benchmark import compare, format_table

    model = result.model
    assert isinstance(model, PipelineClient)
    report = compare(model, None, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len, args.new_tokens,
                     baselines=(), generator_type=PipelinedGenerator)
    report.update({"model": args.model, "pp": len(model.split.stages), "layer_counts": model.split.layer_counts})
    print(json.dumps(report) if args.json else format_table(report))
    return 0
