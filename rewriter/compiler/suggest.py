"""`hfrewrite rules suggest MODEL`: a proposed tensor-parallel rule file, read off the graph's dataflow.

For models without a tp_plan. The residual stream is followed from the token embedding through the
residual adds; a matmul whose input comes from the stream through nothing but normalization (no
other matmul on the way) reads it and becomes column-parallel, one whose output is added back into
it writes it and becomes row-parallel; the one producing the logits is the LM head (column-parallel,
gathered) and the token embedding is vocabulary-parallel. A reader whose sharded region would run
into a matmul that is not a writer (a low-rank chain, say) is left replicated. Sites the shipped
generic TP rules already shard (from the tp_plan, `*embed_tokens`) are left out. The result is a
proposal: `hfrewrite compile MODEL --tp N --rules FILE` verifies it.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx
import yaml

from hfrewrite.compiler.capture import capture
from hfrewrite.engine.conditions import not_applicable
from hfrewrite.engine.loader import load_rules, shipped_rule_paths
from hfrewrite.engine.matcher import find_matches
from hfrewrite.engine.scopes import module_of
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.parallel.layout import ParallelLayout

aten = torch.ops.aten
MATMULS = {aten.linear.default: "aten.linear", aten.addmm.default: "aten.addmm"}
# Ops that carry the residual stream along unchanged in meaning.
CARRY_OPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default, aten.view.default,
             aten.reshape.default, aten.clone.default, aten.contiguous.default, aten.dropout.default,
             aten.type_as.default}
SCALE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
ADD_OPS = {aten.add.Tensor}
STOP_OPS = set(MATMULS) | {aten.embedding.default, aten.mm.default, aten.bmm.default, aten.matmul.default}

TEMPLATES = {"rowwise": "rowwise_linear", "colwise": "colwise_linear", "gather": "colwise_gather_linear",
             "vocab": "vocab_parallel_embedding"}
PRIORITIES = {"rowwise": 110, "colwise": 100, "gather": 100, "vocab": 100}
DOCS = {
    "rowwise": "Writes the residual stream back: row-parallel, all-reduce after (bias added once).",
    "colwise": "Reads the residual stream: column-parallel (split by heads where it feeds attention).",
    "gather": "Produces the logits: column-parallel over the vocabulary, logits gathered.",
    "vocab": "Token embedding: vocabulary-parallel lookup, all-reduce.",
}


@dataclass(frozen=True)
class Site:
    """One op the suggestion shards: its node, module path, op name and TP style."""

    node: str
    module_path: str
    op: str
    style: str


def _weight_is_parameter(node: torch.fx.Node) -> bool:
    weight = node.args[1] if node.target == aten.linear.default else node.args[2]
    return isinstance(weight, torch.fx.Node) and weight.op == "get_attr"


def _constant(value: Any) -> bool:
    """A scalar, or a tensor computed from parameters/buffers only (an embedding scale)."""
    if not isinstance(value, torch.fx.Node):
        return True
    seen, queue = {value}, deque([value])
    while queue:
        node = queue.popleft()
        if node.op == "placeholder":
            return False
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                queue.append(source)
    return True


def _carries(node: torch.fx.Node, stream: set[torch.fx.Node]) -> bool:
    """Whether `node` is the residual stream again: a carry op, a constant scale, or an add onto the stream."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target in CARRY_OPS:
        return node.args[0] in stream
    if node.target in SCALE_OPS:
        return node.args[0] in stream and _constant(node.args[1])
    if node.target in ADD_OPS:
        return any(arg in stream for arg in node.args[:2])
    return False


def token_embeddings(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Embedding lookups indexed by input_ids (not positions)."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default:
            index = node.args[1]
            while isinstance(index, torch.fx.Node) and index.op == "call_function" and index.target in CARRY_OPS:
                index = index.args[0]
            if isinstance(index, torch.fx.Node) and index.op == "placeholder" and index.target == "input_ids":
                found.append(node)
    return found


def residual_stream(graph: torch.fx.Graph, embeddings: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes holding the residual stream: the token embedding, carried and added onto, to the end."""
    stream = set(embeddings)
    for node in graph.nodes:  # topological order: one pass reaches the end
        if node not in stream and _carries(node, stream):
            stream.add(node)
    return stream


def _nearest_matmuls(start: Any, stream: set[torch.fx.Node], *, stop_at_stream: bool) -> tuple[set[torch.fx.Node], bool]:
    """Walking back from `start`: the nearest matmuls, and whether the stream is reached without crossing one."""
    found: set[torch.fx.Node] = set()
    reached = False
    if not isinstance(start, torch.fx.Node):
        return found, reached
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        if node in stream:
            reached = True
            if stop_at_stream:
                continue
        if node.op == "call_function" and node.target in MATMULS:
            found.add(node)
            continue
        if node.op == "call_function" and node.target in STOP_OPS:
            continue
        for source in node.all_input_nodes:
            if source not in seen and source.op not in ("get_attr",):
                seen.add(source)
                queue.append(source)
    return found, reached


def _region_ends(start: torch.fx.Node, stream: set[torch.fx.Node]) -> tuple[set[torch.fx.Node], bool]:
    """Walking forward from `start`: the matmuls its region runs into, and whether it reaches the stream or output."""
    ends: set[torch.fx.Node] = set()
    leaks = False
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output" or user in stream:
                leaks = True
            elif user.op == "call_function" and user.target in STOP_OPS:
                ends.add(user)
            else:
                queue.append(user)
    return ends, leaks


def classify(graph_module: torch.fx.GraphModule) -> tuple[list[Site], list[str]]:
    """The sites to shard, in graph order, and notes on matmuls left replicated (and why)."""
    graph = graph_module.graph
    embeddings = token_embeddings(graph)
    stream = residual_stream(graph, embeddings)
    matmuls = [node for node in graph.nodes if node.op == "call_function" and node.target in MATMULS
               and _weight_is_parameter(node)]
    writers: set[torch.fx.Node] = set()
    for node in stream:
        if node.op == "call_function" and node.target in ADD_OPS:
            for arg in node.args[:2]:
                if isinstance(arg, torch.fx.Node) and arg not in stream:
                    writers |= _nearest_matmuls(arg, stream, stop_at_stream=True)[0]
    output = next(node for node in graph.nodes if node.op == "output")
    logits = _nearest_matmuls(output.args[0], set(), stop_at_stream=False)[0]
    sites: list[Site] = []
    notes: list[str] = []
    for node in embeddings:
        sites.append(Site(node.name, module_of(node)[0], "aten.embedding", "vocab"))
    for node in matmuls:
        path = module_of(node)[0]
        x = node.args[0] if node.target == aten.linear.default else node.args[1]
        reads = _nearest_matmuls(x, stream, stop_at_stream=True)[1]
        if node in logits and reads:
            sites.append(Site(node.name, path, MATMULS[node.target], "gather"))
        elif node in writers and reads:
            notes.append(f"{path}: reads and writes the residual stream; left replicated")
        elif node in writers:
            sites.append(Site(node.name, path, MATMULS[node.target], "rowwise"))
        elif reads:
            ends, leaks = _region_ends(node, stream)
            strays = sorted(module_of(end)[0] for end in ends if end not in writers)
            if leaks or strays:
                why = "its output reaches the residual stream directly" if leaks else \
                    f"its output feeds {', '.join(strays)}, which does not write the residual stream"
                notes.append(f"{path}: {why}; left replicated")
            else:
                sites.append(Site(node.name, path, MATMULS[node.target], "colwise"))
        else:
            notes.append(f"{path}: neither reads nor writes the residual stream; left replicated")
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    return sorted(sites, key=lambda site: order[site.node]), notes


def covered_sites(graph_module: torch.fx.GraphModule, config: Any, tp: int, extra: Sequence[Path] = ()) -> dict[str, str]:
    """node name -> rule name, for sites the shipped generic TP rules (and `extra` files) already shard."""
    ctx = rewrite_context(graph_module, config, ParallelLayout(tp=tp))
    one_device = rewrite_context(graph_module, config)
    ruleset = load_rules(list(shipped_rule_paths(None)) + [Path(path) for path in extra])
    covered: dict[str, str] = {}
    for rule in ruleset:
        # the TP rules: they run under tp and do not on one device (their `when:` reads tp)
        if rule.applies_to(ctx.model_type) and not_applicable(rule, ctx) is None and \
                not_applicable(rule, one_device) is not None:
            for match in find_matches(graph_module, rule, ctx)[0]:
                covered[match.root.name] = rule.name
    return covered


def _glob(path: str) -> str:
    """Layer indices become '*': model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", path)


def suggest_rules(config: Any, model_name: str, tp: int = 2, extra: Sequence[Path] = ()) -> str:
    """The proposed rule file (YAML text with a comment header) for the model of `config`."""
    captured = capture(config)
    sites, notes = classify(captured.graph_module)
    covered = covered_sites(captured.graph_module, config, tp, extra)
    model_type = str(config.model_type)
    groups: dict[tuple[str, str], list[str]] = {}
    skipped: dict[str, str] = {}
    for site in sites:
        if site.node in covered:
            skipped.setdefault(_glob(site.module_path), covered[site.node])
            continue
        scopes = groups.setdefault((site.style, site.op), [])
        if _glob(site.module_path) not in scopes:
            scopes.append(_glob(site.module_path))
    rules = []
    for style, op in sorted(groups, key=lambda key: (-PRIORITIES[key[0]], key[0], key[1])):
        scopes = groups[style, op]
        suffix = op.split(".")[-1]
        rules.append({"name": f"suggested-tp-{style}-{suffix}", "doc": DOCS[style], "priority": PRIORITIES[style],
                      "match": {"op": op, "scope": scopes if len(scopes) > 1 else scopes[0]},
                      "rewrite": {"template": TEMPLATES[style]}})
    header = [f"# Proposed tensor-parallel rules for {model_type} ({model_name}), from the graph's dataflow:",
              "# matmuls that read the residual stream are column-parallel, those that write it back row-parallel.",
              f"# Check them: hfrewrite compile {model_name} --tp {tp} --rules THIS_FILE"]
    arch = [path for path in shipped_rule_paths(model_type) if path.parent.name == "arch"]
    if arch:
        header.append(f"# {arch[0].name} in the shipped rules/arch already shards {model_type}; this proposal would "
                      f"replace it (both at once are refused as overlapping).")
    header += [f"# already sharded by shipped rule {rule}: {path}" for path, rule in sorted(skipped.items())]
    header += [f"# {text}" for text in sorted(dict.fromkeys(_glob(text) for text in notes))]
    if not rules:
        header.append("# nothing left to propose")
        return "\n".join(header) + "\nrules: []\n"
    body = yaml.safe_dump({"models": [model_type], "rules": rules}, sort_keys=False, width=120)
    return "\n".join(header) + "\n" + body
