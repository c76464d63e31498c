"""The one build: resolve -> capture -> rewrite -> place -> load -> compile -> verify.

Each stage is timed; the report says what was done so `hfrewrite compile` can print it. The stages live
in their own modules (capture, rewrite, load, verify). The ParallelLayout is made once here; pipeline
parallelism is its placement step (hfrewrite.parallel.pp.build.place_stages: split, then load and
compile the stages this process runs), for one process and for launched ranks alike.
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from hfrewrite.compiler.capture import capture, retarget_devices
from hfrewrite.compiler.kinds import ModelKind, kind_for
from hfrewrite.compiler.load import WeightProvider, install_weights, load_graph_weights
from hfrewrite.compiler.options import CompileOptions, CompileResult, granularity_on, timed
from hfrewrite.compiler.rewrite import KV_CACHES, rewrite, rule_paths
from hfrewrite.compiler.sources import ModelSource, resolve
from hfrewrite.compiler.weights import load_weights
from hfrewrite.device import parse_dtype, pick_device
from hfrewrite.engine.apply import RewriteReport
from hfrewrite.engine.loader import load_rules
from hfrewrite.errors import UnsupportedKindError
from hfrewrite.parallel import distributed
from hfrewrite.parallel.layout import place
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.parallel.sharding import Slicer
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.model import CompiledModel, StepModel
from hfrewrite.runtime.runner import supports_device_graphs

DEFAULT_SERVING_CACHE = CacheConfig(block_size=16, num_blocks=512)  # what `generate` uses unless told

__all__ = ["CompileOptions", "CompileResult", "build", "build_compiled", "compile_model", "explain_model",
           "reference_model"]


def build_compiled(config: PretrainedConfig, weights: WeightProvider, options: CompileOptions,
                   timings: dict[str, float], kind: ModelKind | None = None) -> tuple[StepModel, RewriteReport]:
    """Capture, rewrite, place, load (through `weights`) and compile the model of `config` (of `kind`, default
    its own) on this process's ParallelLayout, made here once (joined when the run spans ranks)."""
    kind = kind or kind_for(config)
    if kind.head != "sample" and options.layout().pp > 1:
        raise UnsupportedKindError(f"pipeline parallelism (--pp) is not supported for {kind.name} models yet")
    layout = place(options.layout(pick_device(options.device)))
    device = layout.device
    assert device is not None
    dtype = parse_dtype(options.dtype, device)
    granularity = granularity_on(options.granularity, device, layout.tp)
    with timed(timings, "capture"):
        captured = capture(config, dtype, kind)
    with timed(timings, "rewrite"):
        context, report = rewrite(captured, rule_paths(options.rules, config.model_type), layout, dtype=dtype,
                                  library=options.templates, cut=granularity == "layer")
    graph_module = captured.graph_module
    retarget_devices(graph_module, device)
    if layout.pp > 1:  # place: cut into stages; this process loads and compiles only the stages it runs
        from hfrewrite.parallel.pp.build import place_stages

        return place_stages(captured, context, weights, options, layout, dtype, timings), report
    with timed(timings, "load"):
        install_weights(graph_module, load_graph_weights(captured, context, weights, captured.parameter_specs(),
                                                         device, dtype))
    with timed(timings, "compile"):
        model = CompiledModel(graph_module, context.state.get(KV_CACHES, []), config, device, dtype,
                              backend=options.backend, tp=layout.tp,
                              device_graphs=options.device_graphs and layout.tp == 1,
                              max_graph_batch=options.max_graph_batch, granularity=granularity,
                              progress=options.progress)
        warmup = getattr(kind, "warmup", None)  # a kind whose graph takes other inputs than token ids
        if warmup is None:
            model.warmup()                      # (nothing to compile under eager)
        elif options.backend is not None:
            warmup(model)
    attach = getattr(kind, "attach", None)  # a vision-language model's vision tower, compiled beside the LM
    if attach is not None:
        with timed(timings, "vision"):
            attach(model, config, weights, options.backend)
    if kind.head == "sample" and model.device_graphs and options.backend is not None and supports_device_graphs(device):
        with timed(timings, "device_graphs"):  # captured now for generate's default cache, reused there
            if attach is None:
                model.serving(DEFAULT_SERVING_CACHE)
            else:  # a VLM's decode graphs embed their token ids (runtime/vision_graphs.py)
                from hfrewrite.runtime.vision_graphs import vision_serving

                vision_serving(model, DEFAULT_SERVING_CACHE)
    return model, report


def build(source: ModelSource, options: CompileOptions) -> CompileResult:
    """Capture, rewrite, load and compile `source`; verify unless told not to."""
    timings: dict[str, float] = {}

    def from_checkpoint(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype,
                        slicer: Slicer | None = None) -> dict:
        return load_weights(source.directory, specs, tied, device, dtype, slicer=slicer, progress=options.progress,
                            config=source.config)

    kind = kind_for(source.config, source.directory)  # the directory may hold a sentence-transformers config
    model, report = build_compiled(source.config, from_checkpoint, options, timings, kind)
    result = CompileResult(source, model, report, timings, ep=options.ep)
    if options.verify:
        with timed(timings, "verify"):
            # under tp every rank runs the same forwards; rank 0 alone compares, then tells the others
            first = distributed.rank() == 0
            reference = reference_model(source, model.device, model.dtype, progress=options.progress) if first else None
            result.verification = distributed.broadcast(kind.verify(model, reference, seed=options.verify_seed))
    return result


def reference_model(source: ModelSource, device: torch.device, dtype: torch.dtype,
                    progress: bool = True) -> torch.nn.Module:
    """HF's own eager model (of the source's kind) on the same weights: what every rewrite must preserve.

    Read through a view of the directory holding only the config and the safetensors files, with
    safetensors required and remote code as the user allowed it: no pickle is ever opened.
    """
    import copy

    from hfrewrite.compiler import trust
    from hfrewrite.compiler.tiny import hf_progress_bars

    kind = kind_for(source.config, source.directory)
    with hf_progress_bars(progress), trust.safetensors_view(source.directory) as view:
        model = kind.reference(view, dtype, config=copy.deepcopy(source.config))
    return model.to(device).eval()


def compile_model(model_id: str, options: CompileOptions | None = None) -> CompileResult:
    """Resolve a model id and build it (the library entry point behind `hfrewrite compile`)."""
    options = options or CompileOptions()
    return build(resolve(model_id, progress=options.progress), options)


def explain_model(model_id: str, options: CompileOptions | None = None) -> str:
    """Per rule: the sites it matches and the near misses with reasons (the rules applied to a copy of the graph)."""
    from hfrewrite.engine.apply import explain

    options = options or CompileOptions()
    source = resolve(model_id, progress=options.progress)
    device = pick_device(options.device)
    captured = capture(source.config, parse_dtype(options.dtype, device), kind_for(source.config, source.directory))
    context = rewrite_context(captured.graph_module, captured.config, options.layout(device),
                              dtype=parse_dtype(options.dtype, device), logits=captured.kind.output == "logits")
    ruleset = load_rules(rule_paths(options.rules, source.config.model_type), library=options.templates)
    text = explain(context, ruleset).to_text()
    if options.layout().pp > 1:  # the cut, on a rewritten copy (this graph stays unrewritten)
        from hfrewrite.parallel.pp.build import describe_split

        text += "\n\n" + describe_split(source.config, options).to_text()
    return text
