"""Templates of the logits rule family (rules/logits/rules.yaml).

select_logit_rows: linear(h, W) -> linear(index_select(h, 1, logits_index), W): the LM head runs only on the
rows that are sampled (each sequence's last token), not on every packed token.
"""
from __future__ import annotations

import torch

from hfrewrite.engine.context import RewriteContext
from hfrewrite.engine.matcher import Match
from hfrewrite.engine.templates import Template, template
from hfrewrite.rules.attention.templates import EXAMPLE_SEQS, _fake
from hfrewrite.runtime.signature import Role, input_name


@template("select_logit_rows",
          equation="linear(index_select(h, 1, idx), W) == index_select(linear(h, W), 1, idx)")
def select_logit_rows(ctx: RewriteContext, match: Match) -> None:
    node = match.root
    hidden = node.args[0]
    index = ctx.add_placeholder(input_name(Role.LOGIT_ROWS), _fake((EXAMPLE_SEQS,), torch.long, hidden.meta["val"]))
    selected = ctx.insert_call(torch.ops.aten.index_select.default, (hidden, 1, index), {}, like=node)
    new = ctx.insert_call(node.target, (selected, *node.args[1:]), dict(node.kwargs), like=node)
    ctx.replace(match, new)


# The templates this family ships (the shipped TemplateLibrary is built from every family's list).
TEMPLATES: list[Template] = [select_logit_rows]
