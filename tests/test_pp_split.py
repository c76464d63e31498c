"""Pipeline split, graph level, in one process: the stage graphs run one after another compute what the
whole rewritten graph computes, each stage holds its share of the parameters and its layers' caches,
and bad requests (too many stages, bad layer counts, a pp_plan that does not fit) fail clearly."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hfrewrite.compiler.capture import capture, retarget_devices
from hfrewrite.compiler.derived import derived_parameters, load_with_derived
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.compiler.build import CompileOptions, build_compiled
from hfrewrite.compiler.load import install_weights
from hfrewrite.compiler.rewrite import KV_CACHES, rewrite, rule_paths
from hfrewrite.parallel.pp.stage import PipelinedModel, compile_stages
from hfrewrite.runtime.step import Chunk, pack
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig
from hfrewrite.parallel.pp.split import StageSplit, StageSplitError, layer_counts, split_stages
from hfrewrite.compiler.tiny import tiny_config, tiny_model
from hfrewrite.compiler.verify import draw_pieces, verify

from .equivalence import state_dict_weights

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
LAYERS = 4
# llama/qwen3/qwen3_moe/gemma3_text have a pp_plan (gemma3 also ties its LM head to the embedding;
# qwen3_moe has a list of experts inside each layer); olmoe has only the class's lm_head entry and
# gpt2 none: their layer lists are found in the module tree.
PLANNED = ["llama", "qwen3", "qwen3_moe", "gemma3_text"]
MODELS = PLANNED + ["olmoe", "gpt2"]


@dataclass
class Built:
    """One tiny model rewritten for one device, its weights in place, and the HF reference."""

    model_type: str
    config: object
    whole: CompiledModel
    kv_specs: list
    tied: dict[str, str]
    reference: torch.nn.Module

    def split(self, stages: int, counts: list[int] | None = None) -> StageSplit:
        return split_stages(self.whole.graph_module, self.config, self.kv_specs, stages, counts, tied=self.tied)

    def pipelined(self, split: StageSplit, backend: str | None = None) -> PipelinedModel:
        return PipelinedModel(split, compile_stages(split, split.stages, self.config, CPU, torch.float32, backend),
                              self.config, CPU, torch.float32)


def _build(model_type: str, seed: int = 0) -> Built:
    config = tiny_config(model_type, num_hidden_layers=LAYERS)
    reference = tiny_model(config, seed)
    captured = capture(config)
    context, _ = rewrite(captured, rule_paths([], model_type))
    module = captured.graph_module
    retarget_devices(module, CPU)
    tensors = load_with_derived(captured.parameter_specs(), derived_parameters(context.state), lambda specs:
                                state_dict_weights(reference)(specs, captured.tied_weights, CPU, torch.float32))
    tensors.update(captured.buffers)
    install_weights(module, tensors)
    specs = list(context.state.get(KV_CACHES, []))
    return Built(model_type, config, CompiledModel(module, specs, config, CPU, torch.float32, backend=None), specs,
                 dict(captured.tied_weights), reference)


@pytest.fixture(scope="module", params=MODELS)
def built(request: pytest.FixtureRequest) -> Built:
    return _build(request.param)


def _random_run(models: list, vocab: int, seed: int) -> list[list[torch.Tensor]]:
    """Every model on the same fresh random packed steps (prefill pieces and decodes of 3 sequences),
    each with its own cache; the logits of every token of every step, per model."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(3, 20, (3,), generator=generator)]
    prompts = [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]
    config = CacheConfig(block_size=4, num_blocks=sum(-(-n // 4) for n in lengths) + 1)
    caches = [model.new_cache(config) for model in models]
    allocator = BlockAllocator(config.num_blocks)
    blocks = [allocator.allocate(config.blocks_for(n)) for n in lengths]
    pieces = draw_pieces(lengths, generator, decode_steps=3)
    cursor = [0] * len(lengths)
    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    while any(pieces):
        chunks = []
        for i in [i for i in range(len(lengths)) if pieces[i]]:
            size = pieces[i].pop(0)
            chunks.append(Chunk(prompts[i][cursor[i]:cursor[i] + size].tolist(), cursor[i], blocks[i]))
            cursor[i] += size
        step = pack(chunks, config.block_size, CPU)
        rows = torch.arange(step.input_ids.shape[1])
        for out, model, cache in zip(outputs, models, caches):
            out.append(model.forward(step, cache, rows=rows))
    return outputs


def test_stages_in_order_equal_the_whole_graph(built: Built) -> None:
    """PP=2 and a 3-stage uneven cut give the whole graph's logits on the same random packed steps."""
    models = [built.whole, built.pipelined(built.split(2)), built.pipelined(built.split(3, [1, 2, 1]))]
    whole, two, three = _random_run(models, int(built.config.vocab_size), seed=7)
    for ours2, ours3, theirs in zip(two, three, whole):
        torch.testing.assert_close(ours2, theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours3, theirs, rtol=0, atol=1e-5)


def test_each_stage_holds_its_share(built: Built) -> None:
    """Layer i's parameters and cache are on the stage holding layer i only; the embedding on the first
    stage, the LM head on the last; nothing is left out; tied weights are on both stages that use them."""
    split = built.split(2)
    plan = split.plan
    pattern = re.compile(rf"{re.escape(plan.layers_path)}\.(\d+)\.")
    whole_names = {name for name, _ in built.whole.graph_module.named_parameters(remove_duplicate=False)}
    held: set[str] = set()
    for stage in split.stages:
        names = set(stage.parameter_names())
        held |= names
        layers = {int(m.group(1)) for m in map(pattern.match, names) if m}
        assert layers == set(stage.layers), (stage.index, layers)
        mine = {spec.site for spec in built.kv_specs if int(pattern.match(spec.module_path + ".").group(1)) in stage.layers}
        assert {spec.site for spec in stage.kv_specs} == mine
        assert [n for n in stage.input_names if n.startswith("k_cache_")] == \
            [f"k_cache_{spec.site}" for spec in stage.kv_specs]
        per_layer = sum(p.numel() for n, p in built.whole.graph_module.named_parameters() if pattern.match(n)) // LAYERS
        outside = stage.parameter_count() - per_layer * len(stage.layers)
        assert outside >= 0
    assert held == whole_names
    first, last = split.stages[0], split.stages[-1]
    embedding = next(n for n in whole_names if "emb" in n or "wte" in n)
    assert embedding in first.parameter_names()
    head = [n for n in last.parameter_names() if n.startswith("lm_head") or built.tied.get(n)]
    assert head, last.parameter_names()
    if built.tied:
        source = next(iter(built.tied.values()))
        assert split.shared_parameters.get(source) == [0, 1], split.shared_parameters
    total = sum(stage.parameter_count() for stage in split.stages)
    shared = sum(dict(built.whole.graph_module.named_parameters(remove_duplicate=False))[name].numel()
                 for name in split.shared_parameters)
    assert total - shared == sum(p.numel() for p in built.reference.parameters())


def test_only_the_hidden_state_crosses(built: Built) -> None:
    """Rotary tables and sizes are recomputed from the step inputs: one [1, T, hidden] tensor per cut."""
    split = built.split(3, [1, 2, 1])
    hidden = int(built.config.hidden_size)
    for stage in split.stages[:-1]:
        assert [(v.shape, v.dtype) for v in stage.sends] == [((1, "T", hidden), torch.float32)], stage.sends
        assert stage.layers.stop - 1 == int(re.search(r"\.(\d+)$", stage.sends[0].module_path).group(1))
    for before, after in zip(split.stages, split.stages[1:]):
        assert before.sends == after.receives
    expected = "pp_plan" if built.model_type in PLANNED else "derived"
    assert split.plan.source == expected
    text = split.to_text()
    assert "stage 2: layers 3" in text and "-> stage 1:" in text


def test_layer_counts() -> None:
    assert layer_counts(30, 2) == [15, 15]
    assert layer_counts(30, 4) == [8, 8, 7, 7]
    assert layer_counts(24, 2, [10, 14]) == [10, 14]
    assert layer_counts(24, 0, [10, 14]) == [10, 14]
    with pytest.raises(StageSplitError, match="more pipeline stages than the model has decoder layers"):
        layer_counts(2, 3)
    with pytest.raises(StageSplitError, match="adds up to 23 layers; the model has 24"):
        layer_counts(24, 2, [10, 13])
    with pytest.raises(StageSplitError, match="gives 2 stage sizes .* but --pp is 3"):
        layer_counts(24, 3, [10, 14])


def test_a_plan_that_does_not_fit_the_module_tree() -> None:
    """A pp_plan naming a module the graph does not have is refused with the modules it does have."""
    config = tiny_config("llama", num_hidden_layers=2)
    captured = capture(config)
    config.base_model_pp_plan = {"embed_tokens": (["input_ids"], ["inputs_embeds"]),
                                 "layers": (["hidden_states"], ["hidden_states"]),
                                 "final_layernorm": (["hidden_states"], ["hidden_states"])}
    with pytest.raises(StageSplitError, match="final_layernorm.*not in the captured graph.*model.norm"):
        split_stages(captured.graph_module, config, [], 2)
    config.base_model_pp_plan = {"embed_tokens": (["input_ids"], ["inputs_embeds"])}  # no layers: derived
    split = split_stages(captured.graph_module, config, [], 2)
    assert split.plan.source == "derived" and "model.embed_tokens.weight" in split.stages[0].parameter_names()
    with pytest.raises(StageSplitError, match="more pipeline stages"):
        split_stages(captured.graph_module, tiny_config("llama", num_hidden_layers=2), [], 3)


def test_build_compiled_pp_verifies_against_hf() -> None:
    """`build_compiled` with pp=2 in one process (each stage loads its own weights, dynamo compiles each
    stage once): HF eager's logits on packed, chunked, paged batches, and no recompiles."""
    config = tiny_config("qwen3", num_hidden_layers=LAYERS)
    reference = tiny_model(config, 3)
    options = CompileOptions(backend="eager", verify=False, progress=False, device="cpu", pp=2, pp_layers=(3, 1))
    model, report = build_compiled(config, state_dict_weights(reference), options, {})
    assert isinstance(model, PipelinedModel)
    assert [len(stage.stage.layers) for stage in model.stages] == [3, 1]
    assert report.applied["paged-attention"] == LAYERS
    result = verify(model, reference, seed=3, atol=1e-4)
    assert result.passed, result
    assert model.compile_frames == 2  # one graph per stage, for prefill and decode steps alike
    assert model.parameter_count() == sum(p.numel() for p in reference.parameters())


def test_explain_and_report_show_the_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfrewrite.compiler.build import compile_model, explain_model
    from hfrewrite.compiler.report import compile_report, format_compile_report

    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path))
    options = CompileOptions(backend=None, progress=False, device="cpu", pp=2)
    text = explain_model("tiny:gpt2", options)
    assert "pipeline split: 2 stages over 2 layers of transformer.h (derived" in text
    assert re.search(r"-> stage 1: \w+ \[1, T, 64\] float32 \(from transformer\.h\.0\)", text), text
    assert "transformer.wte.weight is held by stages 0, 1 (tied weight)" in text
    result = compile_model("tiny:gpt2", options)
    report = compile_report(result)
    assert report["verify"]["passed"] and report["pp"]["layer_counts"] == [1, 1]
    assert report["pp"]["per_stage"][1]["kv_cache_sites"] == [1]
    assert "stage 1  layers 1" in format_compile_report(report)
