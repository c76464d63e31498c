"""The rewrite stage: which rule files apply to a model, and applying them to its captured graph."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from hfrewrite.compiler.capture import CapturedModel
from hfrewrite.engine.apply import RewriteReport, apply_rules
from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.loader import load_rules, shipped_rule_paths
from hfrewrite.engine.templates import TemplateLibrary
from hfrewrite.parallel.layout import ParallelLayout
from hfrewrite.parallel.plans import rewrite_context
from hfrewrite.parallel.sharding import check_sharded
from hfrewrite.rules.attention.templates import KV_CACHES
from hfrewrite.rules.attention_patterns.templates import CAPTURED_BUFFERS
from hfrewrite.rules.fuse.templates import GRAPH_CUT

__all__ = ["KV_CACHES", "rewrite", "rule_paths"]


def rule_paths(extra: Sequence[Path], model_type: str | None = None) -> list[Path]:
    """The shipped rule files (arch/ files only for the model types they name), then the user's."""
    return list(shipped_rule_paths(model_type)) + [Path(p) for p in extra]


def rewrite(captured: CapturedModel, paths: Sequence[Path], layout: ParallelLayout | None = None, *,
            dtype: torch.dtype | None = None, library: TemplateLibrary | None = None, cut: bool = False
            ) -> tuple[RewriteContext, RewriteReport]:
    """Apply the rule files to the captured graph (in place) for this rank's `layout` (default: one device);
    the rules' `when:` reads tp, ep, pp, rank and device from the layout, the dtype, and whether the graph
    returns logits (false for embedding models). `cut`: the graph is cut into pieces afterwards (layer-wise
    compile); pipeline stages (pp > 1) are cut too."""
    context = rewrite_context(captured.graph_module, captured.config, layout, dtype=dtype,
                              logits=captured.kind is None or captured.kind.output == "logits")
    context.state[CAPTURED_BUFFERS] = captured.buffers  # real mask tables, for attention_patterns' mask probe
    context.state[GRAPH_CUT] = cut or context.options.get("pp", 1) > 1
    report = apply_rules(context, load_rules(paths, library=library))
    check_sharded(context)
    return context, report
