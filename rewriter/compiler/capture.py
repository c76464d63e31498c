"""Capture: an HF model built on the meta device, exported to a plain FX graph.

The graph takes `input_ids` and `position_ids` of shape [1, T] (T dynamic: one packed row of tokens
from many sequences) and returns logits [1, T, V]; the model's kind (hfrewrite.compiler.kinds) says
which HF class, inputs and output (an embedding model: last hidden states [1, T, H]). Parameters
stay as module attributes under their HF names (so weights load by name and rules can scope by module path); every call node keeps
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
from transformers import PretrainedConfig

from hfrewrite.compiler import attention_marker
from hfrewrite.compiler import experts_marker
from hfrewrite.compiler.capture_blame import explain_failure
from hfrewrite.compiler.kinds import ModelKind, kind_for
from hfrewrite.compiler.kinds.base import MAX_TOKENS
from hfrewrite.errors import CaptureError

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
    kind: ModelKind | None = None

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


def build_meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32,
                     kind: ModelKind | None = None) -> torch.nn.Module:
    """The HF module (of `kind`'s auto class) with parameters on meta and buffers real, attention routed to the marker op."""
    kind = kind or kind_for(config)
    implementation = attention_marker.register()
    if not _routes_attention(kind, config):
        # the model computes attention itself (raw SDPA or softmax(q @ k^T) @ v): capture its eager code;
        # the attention_patterns rules find it in the graph
        implementation = "eager"
    config = copy.deepcopy(config)  # from_config records the attention implementation on the config
    config._attn_implementation = implementation
    config._experts_implementation = experts_marker.register()  # MoE experts -> hfrewrite::experts marker
    with accelerate.init_empty_weights(include_buffers=False):
        try:
            model = kind.hf_class().from_config(config, attn_implementation=implementation, dtype=dtype)
        except ValueError as error:
            raise CaptureError(f"transformers cannot build a {kind.name} model ({kind.auto_class}) for model type "
                               f"{config.model_type!r}: {error}") from error
    return model.eval()


class _OneItemListIndex(torch.overrides.TorchFunctionMode):
    """`x[..., [i]]` as `x[..., i:i+1]` while capturing (falcon's multi-query key/value split).

    A list index becomes an index tensor made on the meta device the model is captured on, lifted into the
    graph as a constant whose value is then lost; the slice is the same tensor with no constant.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(_one_int_list(item) for item in index):
                index = tuple(_as_slice(item) if _one_int_list(item) else item for item in index)
                return func(args[0], index)
        return func(*args, **kwargs)


def _one_int_list(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 1 and isinstance(item[0], int) and not isinstance(item[0], bool)


def _as_slice(item: list[int]) -> slice:
    value = item[0]
    return slice(value, value + 1 if value != -1 else None)


POSITION_FIELDS = ("max_position_embeddings", "max_seq_len", "n_positions")


def position_limit(config: PretrainedConfig) -> int:
    """The longest sequence the config sizes its tables for (MAX_TOKENS + 1 when it names none)."""
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return MAX_TOKENS + 1


def _routes_attention(kind: ModelKind, config: PretrainedConfig) -> bool:
    """Whether the model class calls attention through transformers' AttentionInterface."""
    mapping = getattr(kind.hf_class(), "_model_mapping", None)
    model_class = mapping.get(type(config), None) if mapping is not None else None
    return model_class is None or bool(getattr(model_class, "_supports_attention_backend", True))


def capture(config: PretrainedConfig, dtype: torch.dtype = torch.float32,
            kind: ModelKind | None = None) -> CapturedModel:
    """Export the model for `config` in `dtype` to a plain GraphModule (see module docstring).

    The dtype is baked into the graph (HF norms cast back to the input dtype), so capture per dtype.
    `kind` defaults to the one the config says (kind_for).
    """
    kind = kind or kind_for(config)
    model = build_meta_model(config, dtype, kind)
    saved = set(model.state_dict().keys())
    persistent = tuple(sorted(name for name, _ in model.named_buffers() if name in saved))
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if name not in saved}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    model.to("meta")
    # a model that builds its own causal mask slices a [max_positions, max_positions] table by T
    max_tokens = MAX_TOKENS if _routes_attention(kind, config) else min(MAX_TOKENS, position_limit(config) - 1)
    kwargs, dynamic = kind.example_inputs("meta", parameters=(), max_tokens=max_tokens)  # use_cache goes through tokens_forward
    # float inputs (a VLM's inputs_embeds) in the model's dtype: HF norms cast back to the input's dtype
    kwargs = {name: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
              for name, value in kwargs.items()}
    try:
        with torch.no_grad(), tokens_forward(model, tuple(kwargs)), kind.capturing(model), _OneItemListIndex():
            program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)
    except (RuntimeError, TypeError, ValueError, AssertionError, NotImplementedError) as error:
        raise CaptureError(f"torch.export could not capture {type(model).__name__} "
                           f"(model type {config.model_type!r}): {explain_failure(error, model)}") from error
    graph_module = _plain_graph_module(program, kind.output)
    if kind.finish_graph is not None:
        kind.finish_graph(model, graph_module)
    # a buffer the graph never reads (phimoe's longrope recomputes its frequencies) has no owner module left
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    buffers = {name: buffer for name, buffer in buffers.items() if name in used}
    return CapturedModel(config=config, graph_module=graph_module, buffers=buffers, tied_weights=tied,
                         model_class=type(model).__name__, checkpoint_buffers=persistent, kind=kind)


@contextlib.contextmanager
def tokens_forward(model: torch.nn.Module, names: tuple[str, ...] = ("input_ids", "position_ids")) -> Iterator[None]:
    """For one block, `model.forward(<names>)`: the model's own forward on exactly the kind's inputs, use_cache off.

    torch.export wants `dynamic_shapes` to mirror forward's signature, and each model type takes its
    keywords differently: as named parameters, or only through `**kwargs` (granitemoe's use_cache),
    which torch.export's dynamic shapes do not handle. Exporting through a forward of the same module
    whose signature is exactly `names` (parameter names and module paths unchanged) fits every model.
    """
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in names if name not in parameters]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if missing and not takes_any:
        raise CaptureError(f"{type(model).__name__}.forward takes no {', '.join(missing)} (its parameters: "
                           f"{', '.join(parameters)}); hfrewrite feeds {', '.join(names)}")
    extra = {"use_cache": False} if "use_cache" in parameters or takes_any else {}
    original = model.forward
    signature = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])

    def forward(*args: Any, **kwargs: Any) -> Any:
        return original(**signature.bind(*args, **kwargs).arguments, **extra)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def _plain_graph_module(program: torch.export.ExportedProgram, output: str = "logits") -> torch.fx.GraphModule:
    """Unlift the program and strip its pytree plumbing, guards and meta-device assertions.

    What is left: placeholders input_ids, position_ids (and the kind's others); one output, `output`.
    """
    module = program.module()
    out_spec = module._out_spec if hasattr(module, "_out_spec") else program.call_spec.out_spec
    graph = module.graph
    graph._codegen = torch.fx.graph.CodeGen()
    output_node = next(n for n in graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    indices = pytree.tree_unflatten(list(range(len(flat_outputs))), out_spec)
    output_index = indices[output] if isinstance(indices, dict) else getattr(indices, output)
    output_node.args = (flat_outputs[output_index],)
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
