"""Pipeline split: the rewritten graph cut into stages, one GraphModule per stage.

The cut follows the model's `pp_plan` (config `base_model_pp_plan` plus the causal-LM class's
`_pp_plan`): the modules before the decoder layers (embedding) go to the first stage, the layers
are divided between the stages, the modules after them (final norm, LM head) go to the last one.
Models without a pp_plan get one derived from their single list of decoder layers, as the nodes'
`nn_module_stack` shows it ('transformer.h.3' for GPT-2).

Each node gets a home:
- a node inside layer i lives on the stage holding layer i;
- a node computed only from step inputs and buffers (rotary cos/sin from position_ids, sizes) is
  *recomputed* on every stage that needs it: every rank has the step inputs anyway, and a few
  elementwise ops on [T, head_dim] cost less than sending two [T, head_dim] tensors per hop;
- a node that reads parameters but no other stage's values (the embedding lookup, a transposed
  weight) lives on the first stage that uses it, so its weights are loaded there only;
- any other node lives on the latest stage of its inputs (residual adds, the final norm).
Values produced on one stage and used on a later one cross every boundary in between (relayed
through the middle stages); that is exactly the activation traffic, typically one hidden-state
tensor [1, T, hidden] per boundary. Each stage's GraphModule references only its own
parameters (tied weights appear on every stage that uses them: the LM head stage of a model with
tied embeddings holds the embedding matrix too) and only its own layers' KV-cache inputs.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from hfrewrite.engine.scopes import _EMPTY_STACK_MARKER, module_of, normalise_module_path
from hfrewrite.parallel.pp.nodes import is_float_tensor, writers_into
from hfrewrite.parallel.pp.plan import LayerPlan, StageSplitError, layer_counts, layer_plan, stage_count
from hfrewrite.runtime.signature import GraphInput

__all__ = ["CrossingValue", "LayerPlan", "Stage", "StageSplit", "StageSplitError", "layer_counts", "layer_plan",
           "split_stages", "stage_count"]



@dataclass(frozen=True)
class CrossingValue:
    """One tensor sent from a stage to the next: the producer node's name, module, shape and dtype."""

    name: str
    module_path: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        where = self.module_path or "top level"
        return f"{self.name} [{dims}] {str(self.dtype).replace('torch.', '')} (from {where})"


@dataclass
class Stage:
    """One pipeline stage: its graph (own parameters and caches only) and what crosses its edges."""

    index: int
    graph_module: torch.fx.GraphModule
    layers: range
    kv_specs: list[Any]
    receives: list[CrossingValue]
    sends: list[CrossingValue]
    recomputed: list[str]

    @property
    def input_names(self) -> list[str]:
        """Placeholder names in order: received values first, then step inputs and caches."""
        return [n.target for n in self.graph_module.graph.nodes if n.op == "placeholder"]

    def parameter_names(self) -> list[str]:
        """The HF names of the parameters this stage holds (tied names each once), sorted."""
        return sorted(name for name, _ in self.graph_module.named_parameters(remove_duplicate=False))

    def parameter_count(self) -> int:
        """Distinct parameter elements this stage holds (storage shared by tied names counts once)."""
        seen: dict[int, int] = {}
        for param in self.graph_module.parameters():
            key = param.untyped_storage().data_ptr() if param.device.type != "meta" else id(param)
            seen[key] = param.numel()
        return sum(seen.values())

    def layer_text(self) -> str:
        if not self.layers:
            return "none"
        return f"{self.layers.start}" if len(self.layers) == 1 else f"{self.layers.start}-{self.layers.stop - 1}"


@dataclass
class StageSplit:
    """The cut: the plan it followed and the stages in order."""

    plan: LayerPlan
    stages: list[Stage]
    shared_parameters: dict[str, list[int]] = field(default_factory=dict)

    @property
    def layer_counts(self) -> list[int]:
        return [len(stage.layers) for stage in self.stages]

    def to_dict(self) -> dict:
        """The `pp` entry of the compile report."""
        return {
            "stages": len(self.stages),
            "plan": self.plan.source,
            "layers_module": self.plan.layers_path,
            "layer_counts": self.layer_counts,
            "shared_parameters": self.shared_parameters,
            "per_stage": [{
                "stage": stage.index,
                "layers": [stage.layers.start, stage.layers.stop - 1] if stage.layers else [],
                "parameters": stage.parameter_count(),
                "kv_cache_sites": [spec.site for spec in stage.kv_specs],
                "receives": [value.describe() for value in stage.receives],
                "sends": [value.describe() for value in stage.sends],
                "recomputed": stage.recomputed,
            } for stage in self.stages],
        }

    def to_text(self) -> str:
        """What `explain --pp N` prints: layers per stage and the tensors crossing each cut."""
        plan = self.plan
        origin = "the model's pp_plan" if plan.source == "pp_plan" else "derived from the module tree (no pp_plan)"
        lines = [f"pipeline split: {len(self.stages)} stages over {plan.num_layers} layers of {plan.layers_path} "
                 f"({origin})"]
        for stage in self.stages:
            extras = []
            if stage.index == 0 and plan.first_modules:
                extras.append("+ " + ", ".join(plan.first_modules))
            if stage.index == len(self.stages) - 1 and plan.last_modules:
                extras.append("+ " + ", ".join(plan.last_modules))
            lines.append(f"  stage {stage.index}: layers {stage.layer_text()} {' '.join(extras)}".rstrip())
            lines.append(f"    parameters {stage.parameter_count():,}, kv-cache sites "
                         f"{_ranges([spec.site for spec in stage.kv_specs]) or 'none'}")
            if stage.recomputed:
                lines.append(f"    recomputed from step inputs: {', '.join(stage.recomputed)}")
            for value in stage.sends:
                target = "stage " + str(stage.index + 1)
                lines.append(f"    -> {target}: {value.describe()}")
        for name, owners in sorted(self.shared_parameters.items()):
            lines.append(f"  {name} is held by stages {', '.join(map(str, owners))} (tied weight)")
        return "\n".join(lines)


def _ranges(values: Sequence[int]) -> str:
    """'0-18, 20' for [0, 1, ..., 18, 20]: site lists of real models are long."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


# ----------------------------------------------------------------------------------------------
# Homes of nodes


def _layer_of(node: torch.fx.Node, pattern: re.Pattern[str]) -> int | None:
    """The decoder layer a node belongs to, from any level of its module stack (None: outside layers)."""
    for raw_path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        if str(raw_path).startswith(_EMPTY_STACK_MARKER):
            continue
        match = pattern.match(normalise_module_path(str(raw_path)))
        if match:
            return int(match.group(1))
    return None


def _in_module(node: torch.fx.Node, module: str) -> bool:
    for raw_path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = normalise_module_path(str(raw_path))
        if path == module or path.startswith(f"{module}."):
            return True
    return False


@dataclass
class _Homes:
    """Per node: its stage (staged nodes), or recomputed where used (step inputs, buffers and what
    is computed from them only), or a parameter fetched where used."""

    stage: dict[torch.fx.Node, int]
    recomputed: set[torch.fx.Node]
    parameters: set[torch.fx.Node]
    shared: set[torch.fx.Node] = field(default_factory=set)   # step values computed once, read by later stages


def _is_cache(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and GraphInput.parse(str(node.target)).is_cache


def _assign(graph_module: torch.fx.GraphModule, plan: LayerPlan, layer_stage: list[int], last: int,
            ends: bool = False, share_step_values: bool = False) -> _Homes:
    """Give every node a home (see the module docstring). With `ends`, stage 0 and stage `last` hold no layers:
    nodes outside the layers go to stage 0 when they come before every layer, to `last` when after one. With
    `share_step_values`, floating-point values computed from step inputs only (rotary cos/sin) are computed
    once, on the first stage that uses them, and sent on like activations instead of recomputed per stage."""
    pattern = re.compile(rf"{re.escape(plan.layers_path)}\.(\d+)(?:\.|$)")
    parameter_names = {name for name, _ in graph_module.named_parameters(remove_duplicate=False)}
    nodes = list(graph_module.graph.nodes)
    stage: dict[torch.fx.Node, int] = {}
    recomputed: set[torch.fx.Node] = set()
    parameters: set[torch.fx.Node] = set()
    pending: list[torch.fx.Node] = []   # read parameters, no staged input: first stage that uses them
    shared: set[torch.fx.Node] = set()
    for node in nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            if not _is_cache(node):
                recomputed.add(node)
            continue  # caches go where their reader is
        if node.op == "get_attr":
            (parameters if node.target in parameter_names else recomputed).add(node)
            continue
        inputs = node.all_input_nodes
        staged = [stage[i] for i in inputs if i in stage]
        layer = _layer_of(node, pattern)
        if layer is not None:
            home = layer_stage[layer]
            if staged and max(staged) > home:
                raise StageSplitError(f"node {node.name} of layer {layer} (stage {home}) reads a value computed on "
                                      f"stage {max(staged)}; the layers of {plan.layers_path} do not run in order")
            stage[node] = home
        elif staged:
            stage[node] = last if ends and max(staged) > 0 else max(staged)
        elif (share_step_values and is_float_tensor(node) and not any(_is_cache(i) for i in inputs)
              and all(i in recomputed or i in shared for i in inputs)):
            pending.append(node)
            shared.add(node)
        elif all(i in recomputed for i in inputs) and not any(_is_cache(i) for i in inputs):
            recomputed.add(node)
        else:
            pending.append(node)
    for node in reversed(pending):
        readers = [last if user.op == "output" else stage[user] for user in node.users]
        stage[node] = min(readers) if readers else 0
        if ends and stage[node] not in (0, last):  # read by a layer, computed outside the layers: before them
            stage[node] = 0
    for node in nodes:
        if _is_cache(node):
            readers = sorted({stage[u] for u in node.users if u in stage})
            if len(readers) != 1:
                raise StageSplitError(f"KV-cache input {node.target} is read on stages {readers}; each layer's "
                                      f"cache must live on exactly one stage")
            stage[node] = readers[0]
    _check_pins(plan, stage, last)
    return _Homes(stage, recomputed, parameters, shared)


def _check_pins(plan: LayerPlan, stage: dict[torch.fx.Node, int], last: int) -> None:
    """The pp_plan's modules before the layers must be on the first stage, those after on the last."""
    for node, home in stage.items():
        for module, want in [(m, 0) for m in plan.first_modules] + [(m, last) for m in plan.last_modules]:
            if home != want and _in_module(node, module):
                raise StageSplitError(f"the pp_plan puts {module} on stage {want}, but its node {node.name} "
                                      f"computes on stage {home} (it depends on the layers); the plan does not "
                                      f"match the graph")


# ----------------------------------------------------------------------------------------------
# Building the stage graphs


def _crossing(node: torch.fx.Node) -> CrossingValue:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise StageSplitError(f"node {node.name} ({module_of(node)[0] or 'top level'}) is used on a later stage "
                              f"but is a {type(value).__name__}, not a tensor; only tensors can be sent between "
                              f"stages")
    shape = tuple(int(d) if isinstance(d, int) else _symbol_text(d) for d in value.shape)
    return CrossingValue(node.name, module_of(node)[0], shape, value.dtype)


def _symbol_text(dim: Any) -> str:
    """'T' for the token count (the graph's one dynamic dimension), the expression otherwise."""
    text = str(dim)
    return "T" if re.fullmatch(r"[su]\d+", text) else re.sub(r"\b[su]\d+\b", "T", text)


def _stage_graph(graph_module: torch.fx.GraphModule, homes: _Homes, index: int, receives: list[torch.fx.Node],
                 sends: list[torch.fx.Node], output_here: bool) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    """The GraphModule of stage `index`: received values and step inputs in, `sends` (or the logits) out."""
    nodes = list(graph_module.graph.nodes)
    received = set(receives)
    mine = {n for n, s in homes.stage.items() if s == index and n not in received}
    needed: set[torch.fx.Node] = set()
    work = [i for n in mine for i in n.all_input_nodes]
    output = nodes[-1]
    if output_here:
        work += output.all_input_nodes
    work += [n for n in sends if n not in mine]
    while work:
        node = work.pop()
        if node in needed or node in mine or node in received:
            continue
        if node in homes.recomputed or node in homes.parameters:
            needed.add(node)
            work.extend(node.all_input_nodes)
            # in-place writes into it (through views: HF's interleaved M-RoPE copies slices into its freqs) are
            # part of computing it, though nothing reads their results
            work.extend(writer for writer in writers_into(node) if writer in homes.recomputed)
        else:
            raise StageSplitError(f"stage {index} needs node {node.name} from stage {homes.stage.get(node)} but it is "
                                  f"not among the values sent to it (internal error in the split)")
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in receives:
        placeholder = graph.placeholder(node.name)
        placeholder.meta = dict(node.meta)
        env[node] = placeholder
    for node in nodes:
        if node.op == "output" or node in received:
            continue
        if node in mine or node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    if output_here:
        graph.output(torch.fx.node.map_arg(output.args[0], lambda n: env[n]))
    else:
        graph.output(tuple(env[n] for n in sends))
    graph.lint()
    recomputed = [n for n in nodes if n in needed and n.op == "call_function"]
    stage_module = torch.fx.GraphModule(graph_module, graph, class_name=f"PipelineStage{index}")
    return stage_module, recomputed


def split_stages(graph_module: torch.fx.GraphModule, config: Any, kv_specs: Sequence[Any], stages: int,
                 counts: Sequence[int] | None = None, tied: dict[str, str] | None = None,
                 ends: bool = False, share_step_values: bool = False) -> StageSplit:
    """Cut the rewritten graph into `stages` GraphModules (layers near-even, or as `counts` says).

    `tied` (parameter -> the one it shares storage with) only feeds the report of weights held twice.
    `ends` adds two stages without layers: one before the layers (the embedding), one after (norm, head);
    layer-wise compilation (runtime/layers.py) cuts that way so that every layer's stage looks alike, and
    passes `share_step_values` (stages in one process: handing a value on costs nothing, recomputing rotary
    cos/sin in every layer's graph costs a few kernels per layer).
    """
    plan = layer_plan(graph_module, config, [spec.module_path for spec in kv_specs])
    sizes = layer_counts(plan.num_layers, stages, counts)
    if ends:
        sizes = [0, *sizes, 0]
    stages = len(sizes)
    layer_stage = [s for s, size in enumerate(sizes) for _ in range(size)]
    last = stages - 1
    homes = _assign(graph_module, plan, layer_stage, last, ends, share_step_values)
    nodes = list(graph_module.graph.nodes)
    output = nodes[-1]
    # a value crosses boundary b (stage b -> b + 1) when made on a stage <= b and used on a stage > b
    used_until: dict[torch.fx.Node, int] = {}
    for node in nodes:
        for source in node.all_input_nodes:
            if source in homes.stage and not _is_cache(source):
                reader = last if node is output else homes.stage.get(node)
                if reader is not None and reader > homes.stage[source]:
                    used_until[source] = max(used_until.get(source, -1), reader)
    # shared step values are not relayed: the stage that makes them sends them once, each reader reads them
    # directly (first among its inputs, so that the stages of identical layers have identical signatures)
    boundaries = [[n for n in nodes if n in used_until and n not in homes.shared and homes.stage[n] <= b < used_until[n]]
                  for b in range(stages - 1)]
    readers = {n: {last if u is output else homes.stage.get(u) for u in n.users} for n in homes.shared}
    starts = [sum(sizes[:s]) for s in range(stages)]
    built: list[Stage] = []
    for index in range(stages):
        direct = [n for n in nodes if n in homes.shared and homes.stage[n] < index and index in readers[n]]
        receives = direct + (boundaries[index - 1] if index > 0 else [])
        sends = (boundaries[index] if index < last else []) + [
            n for n in nodes if n in homes.shared and homes.stage[n] == index and used_until.get(n, -1) > index]
        module, recomputed = _stage_graph(graph_module, homes, index, receives, sends, index == last)
        cache_sites = {GraphInput.parse(str(n.target)).site for n in module.graph.nodes if _is_cache(n)}
        specs = [spec for spec in kv_specs if spec.site in cache_sites]
        recomputed_modules = sorted({module_of(n)[0] for n in recomputed if module_of(n)[0]})
        built.append(Stage(index, module, range(starts[index], starts[index] + sizes[index]), specs,
                           [_crossing(n) for n in receives], [_crossing(n) for n in sends], recomputed_modules))
    owners: dict[str, set[int]] = {}
    for stage in built:
        for name in stage.parameter_names():
            owners.setdefault((tied or {}).get(name, name), set()).add(stage.index)
    shared = {name: sorted(where) for name, where in sorted(owners.items()) if len(where) > 1}
    return StageSplit(plan, built, shared)
