"""Helpers for engine tests: a tiny llama graph, and running it on real random weights."""
from __future__ import annotations

import torch
import transformers

from hfrewrite.compiler.capture import CapturedModel, capture, retarget_devices


def tiny_llama_config(**overrides: object) -> transformers.PretrainedConfig:
    """A 2-layer llama small enough to capture in about a second."""
    sizes: dict[str, object] = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    sizes.update(overrides)
    return transformers.AutoConfig.for_model("llama", **sizes)


def capture_tiny(**overrides: object) -> CapturedModel:
    """A fresh capture (graphs are rewritten in place, so each test takes its own)."""
    return capture(tiny_llama_config(**overrides))


def random_weights(captured: CapturedModel, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random CPU weights for every parameter the captured graph reads (norm weights near 1)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (shape, dtype) in sorted(captured.parameter_specs().items()):
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.2
        if name.endswith("norm.weight"):
            values = values + 1.0
        weights[name] = values.to(dtype)
    return weights


def materialize(captured: CapturedModel, weights: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """Put real tensors in place of the meta parameters/buffers and retarget the graph to the CPU."""
    graph_module = captured.graph_module
    tensors = {**weights, **captured.buffers}
    for name, tensor in sorted(tensors.items()):
        owner_path, _, leaf = name.rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
        else:
            owner._buffers[leaf] = tensor.clone()
    retarget_devices(graph_module, torch.device("cpu"))
    return graph_module


def random_inputs(seed: int, tokens: int, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [1, T] drawn at random (never all zeros) and positions 0..T-1."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (1, tokens), generator=generator)
    return input_ids, torch.arange(tokens)[None]
