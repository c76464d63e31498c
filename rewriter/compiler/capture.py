"""Capture: an HF model built on the meta device, exported to a plain FX graph.

The graph takes `input_ids` and `position_ids` of shape [1, T] (T dynamic: one packed row of tokens
from many sequences) and returns logits [1, T, V]. Parameters stay as module attributes under their
HF names (so weights load by name and rules can scope by module path); every call node keeps
`nn_module_stack`. Non-persistent buffers (rotary tables) are computed on the CPU at build time and
kept, since they are not in any checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

import accelerate
import torch
import torch.fx
import torch.utils._pytree as pytree
from transformers import AutoModelForCausalLM, PretrainedConfig

from hfrewrite.compiler import attention_marker
from hfrewrite.compiler import experts_marker
from hfrewrite.errors import CaptureError

MAX_TOKENS = 1 << 16
_DROP_TARGETS = {torch.ops.aten._assert_tensor_metadata.default}


@dataclass
class CapturedModel:
    """What capture produces: the graph, plus what it needs that is not in a checkpoint."""

    config: PretrainedConfig
    graph_module: torch.fx.GraphModule
    buffers: dict[str, torch.Tensor]
    tied_weights: dict[str, str] = field(default_factory=dict)
    model_class: str = ""
    checkpoint_buffers: tuple[str, ...] = ()

    def parameter_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor to load from the checkpoint.

        Parameters, plus persistent buffers that are saved in checkpoints (e.g. DeepSeek-V3's router
        score-correction bias); non-persistent buffers (rotary tables) come from `buffers` instead.
        """
        specs = {name: (tuple(p.shape), p.dtype) for name, p in self.graph_module.named_parameters(remove_duplicate=False)}
        for name in self.checkpoint_buffers:
            with contextlib.suppress(AttributeError):
                buffer = self.graph_module.get_buffer(name)
                specs[name] = (tuple(buffer.shape), buffer.dtype)
        return specs


def build_meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF module with parameters on meta and buffers real, attention routed to the marker op."""
    implementation = attention_marker.register()
    config = copy.deepcopy(config)  # from_config records the attention implementation on the config
    config._attn_implementation = implementation
    config._experts_implementation = experts_marker.register()  # MoE experts -> hfrewrite::experts marker
    with accelerate.init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=dtype)
        except ValueError as error:
            raise CaptureError(f"transformers cannot build a causal LM for model type "
                               f"{config.model_type!r}: {error}") from error
    return model.eval()


def capture(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> CapturedModel:
    """Export the model for `config` in `dtype` to a plain GraphModule (see module docstring).

    The dtype is baked into the graph (HF norms cast back to the input dtype), so capture per dtype.
    """
    model = build_meta_model(config, dtype)
    saved = set(model.state_dict().keys())
    persistent = tuple(sorted(name for name, _ in model.named_buffers() if name in saved))
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if name not in saved}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    model.to("meta")
    tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
    example_len = 7
    kwargs = {
        "input_ids": torch.zeros(1, example_len, dtype=torch.long, device="meta"),
        "position_ids": torch.arange(example_len, device="meta")[None],
    }
    dynamic = {"input_ids": {1: tokens}, "position_ids": {1: tokens}}
    try:
        with torch.no_grad(), tokens_forward(model):
            program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)
    except (RuntimeError, TypeError, ValueError, AssertionError, NotImplementedError) as error:
        raise CaptureError(f"torch.export could not capture {type(model).__name__} "
                           f"(model type {config.model_type!r}): {str(error).splitlines()[0]}") from error
    graph_module = _plain_graph_module(program)
    # a buffer the graph never reads (phimoe's longrope recomputes its frequencies) has no owner module left
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    buffers = {name: buffer for name, buffer in buffers.items() if name in used}
    return CapturedModel(config=config, graph_module=graph_module, buffers=buffers, tied_weights=tied,
                         model_class=type(model).__name__, checkpoint_buffers=persistent)


@contextlib.contextmanager
def tokens_forward(model: torch.nn.Module) -> Iterator[None]:
    """For one block, `model.forward(input_ids, position_ids)`: the model's own forward with use_cache off.

    torch.export wants `dynamic_shapes` to mirror forward's signature, and each model type takes its
    keywords differently: as named parameters, or only through `**kwargs` (granitemoe's use_cache),
    which torch.export's dynamic shapes do not handle. Exporting through this two-argument forward of
    the same module (parameter names and module paths unchanged) fits every signature.
    """
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in ("input_ids", "position_ids") if name not in parameters]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if missing and not takes_any:
        raise CaptureError(f"{type(model).__name__}.forward takes no {', '.join(missing)} (its parameters: "
                           f"{', '.join(parameters)}); hfrewrite feeds input_ids and position_ids")
    extra = {"use_cache": False} if "use_cache" in parameters or takes_any else {}
    original = model.forward

    def forward(input_ids: torch.Tensor, position_ids: torch.Tensor) -> Any:
        return original(input_ids=input_ids, position_ids=position_ids, **extra)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def _plain_graph_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """Unlift the program and strip its pytree plumbing, guards and meta-device assertions.

    What is left: placeholders input_ids, position_ids; one output, the logits.
    """
    module = program.module()
    out_spec = module._out_spec if hasattr(module, "_out_spec") else program.call_spec.out_spec
    graph = module.graph
    graph._codegen = torch.fx.graph.CodeGen()
    output_node = next(n for n in graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    indices = pytree.tree_unflatten(list(range(len(flat_outputs))), out_spec)
    logits_index = indices["logits"] if isinstance(indices, dict) else indices.logits
    output_node.args = (flat_outputs[logits_index],)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _DROP_TARGETS:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    # a fresh GraphModule drops the unlifted module's pytree hooks; it copies what get_attr nodes reference
    return torch.fx.GraphModule(module, graph, class_name="CapturedGraph")


def retarget_devices(graph_module: torch.fx.GraphModule, device: torch.device) -> None:
    """Replace the meta device baked into node arguments (arange, to, ...) by the run device."""
    def swap(value):
        if isinstance(value, torch.device) and value.type == "meta":
            return device
        return value

    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, swap)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    graph_module.recompile()
