"""Layer-wise compilation (runtime/layers.py): the pieces group by structure as the architecture says
(llama: embedding, one group of all layers, head; gemma2: sliding and global layers apart), a group compiles
once for all its layers, and the layered model equals the whole-graph compile and HF eager in fp32."""
from __future__ import annotations

import pytest
import torch

from hfrewrite.compiler.build import CompileOptions, build_compiled
from hfrewrite.compiler.tiny import tiny_config, tiny_model
from hfrewrite.compiler.verify import verify
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.layers import LayeredGraph, structural_hash
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.runtime.step import Chunk, pack

from .equivalence import state_dict_weights

pytestmark = pytest.mark.timeout(900)


def _built(model_type: str, layers: int, granularity: str, backend: str | None = "inductor",
           seed: int = 0) -> tuple[CompiledModel, torch.nn.Module]:
    config = tiny_config(model_type, num_hidden_layers=layers)
    reference = tiny_model(config, seed)
    options = CompileOptions(backend=backend, verify=False, progress=False, device="cpu", granularity=granularity)
    model, _ = build_compiled(config, state_dict_weights(reference), options, {})
    return model, reference


@pytest.mark.parametrize("model_type, layers, groups", [
    ("llama", 4, [[0], [1, 2, 3, 4], [5]]),
    ("qwen3_moe", 3, [[0], [1, 2, 3], [4]]),
])
def test_identical_layers_form_one_group(model_type: str, layers: int, groups: list[list[int]]) -> None:
    model, _ = _built(model_type, layers, "graph", backend=None)
    layered = LayeredGraph.cut(model.graph_module, model.config, model.kv_specs)
    assert layered.groups == groups
    shared = [piece for piece in layered.pieces if piece.weights]
    assert [piece.index for piece in shared] == groups[1]  # only shared pieces take their weights as inputs
    assert len({len(piece.weights) for piece in shared}) == 1


def test_sliding_and_global_layers_group_apart() -> None:
    model, _ = _built("gemma2", 6, "graph", backend=None)
    types = list(model.config.layer_types)
    layered = LayeredGraph.cut(model.graph_module, model.config, model.kv_specs)
    middle = layered.groups[1:-1]
    assert layered.groups[0] == [0] and layered.groups[-1] == [7]
    assert len(middle) == 2 == len(set(types))
    for group in middle:  # piece i + 1 holds layer i
        assert len({types[index - 1] for index in group}) == 1, (group, types)


def test_hash_ignores_names_but_not_constants() -> None:
    def graph(scale: float, name: str) -> torch.fx.GraphModule:
        g = torch.fx.Graph()
        x = g.placeholder(name)
        x.meta["val"] = torch.empty(2, 3)
        g.output(g.call_function(torch.ops.aten.mul.Tensor, (x, scale)))
        return torch.fx.GraphModule(torch.nn.Module(), g)

    assert structural_hash(graph(2.0, "add_3")) == structural_hash(graph(2.0, "add_17"))
    assert structural_hash(graph(2.0, "x")) != structural_hash(graph(3.0, "x"))


def _random_steps(vocab: int, generator: torch.Generator) -> list[list[Chunk]]:
    """A prefill of two sequences, then decode tokens, then a mixed step: fresh random tokens each."""
    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()
    return [[Chunk(tokens(5), 0, [0, 1]), Chunk(tokens(3), 0, [2, 3])],
            [Chunk(tokens(1), 5, [0, 1]), Chunk(tokens(1), 3, [2, 3])],
            [Chunk(tokens(2), 6, [0, 1]), Chunk(tokens(1), 4, [2, 3])]]


def test_layerwise_equals_whole_graph_and_hf_eager_and_compiles_once_per_group() -> None:
    layered, reference = _built("llama", 4, "layer")
    whole, _ = _built("llama", 4, "graph")
    assert isinstance(layered._fn, LayeredGraph)
    result = verify(layered, reference, seed=1, atol=1e-4)
    assert result.passed, result
    groups = layered._fn.groups
    assert layered.counter.frames == len(groups) == 3  # 6 pieces, 3 compilations: no recompiles over steps
    vocab = int(layered.config.vocab_size)
    caches = [model.new_cache(CacheConfig(block_size=4, num_blocks=4)) for model in (layered, whole)]
    for chunks in _random_steps(vocab, torch.Generator().manual_seed(3)):
        a, b = (model.forward(pack(chunks, 4, model.device), cache) for model, cache in zip((layered, whole), caches))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert layered.counter.frames == 3 and whole.counter.frames == 1
    # a direct call with autograd on (how a device-graph runner captures) runs the same compiled graphs:
    # dynamo guards the grad mode, and a recompile there cost 5-6 s per capture on the GPU
    with torch.enable_grad():
        for model, cache in zip((layered, whole), caches):
            model.call(model.signature.feeds(pack(_random_steps(vocab, torch.Generator().manual_seed(4))[1], 4,
                                                  model.device), cache))
    assert layered.counter.frames == 3 and whole.counter.frames == 1


def test_gemma2_layerwise_verifies_with_two_layer_groups() -> None:
    model, reference = _built("gemma2", 6, "layer")
    result = verify(model, reference, seed=2, atol=1e-4)
    assert result.passed, result
    assert model.counter.frames == len(model._fn.groups) == 4  # embedding, sliding, global, head


def test_rotary_values_are_computed_once_not_per_layer() -> None:
    """cos/sin of the positions are made in the first piece and handed on: no layer's graph computes them."""
    model, _ = _built("llama", 3, "graph", backend=None)
    layered = LayeredGraph.cut(model.graph_module, model.config, model.kv_specs)
    trig = {torch.ops.aten.cos.default, torch.ops.aten.sin.default}
    per_piece = [sum(node.target in trig for node in piece.graph_module.graph.nodes) for piece in layered.pieces]
    assert per_piece[0] > 0 and per_piece[1:] == [0] * (len(per_piece) - 1), per_piece



def test_auto_granularity_is_layerwise_on_one_accelerator_only() -> None:
    from hfrewrite.compiler.options import granularity_on

    accelerator = torch.device("meta")   # any device but the CPU: only its type is read
    assert granularity_on("auto", accelerator) == "layer"
    assert granularity_on("auto", accelerator, tp=2) == "graph"
    assert granularity_on("auto", torch.device("cpu")) == "graph"
    assert granularity_on("layer", torch.device("cpu")) == "layer" and granularity_on("graph", accelerator) == "graph"
    with pytest.raises(ValueError, match="granularity 'layers'"):
        granularity_on("layers", accelerator)
