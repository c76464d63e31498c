"""Facts about single graph nodes that the pipeline / layer splitter decides homes by."""
from __future__ import annotations

import torch
import torch.fx


def is_float_tensor(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def writers_into(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The in-place ops that write into `node`'s tensor, directly or through views of it."""
    found, work = [], [node]
    while work:
        current = work.pop()
        for user in current.users:
            schema = getattr(user.target, "_schema", None)
            if schema is None or not user.args or user.args[0] is not current:
                continue
            if schema.is_mutable and schema.arguments and schema.arguments[0].alias_info is not None \
                    and schema.arguments[0].alias_info.is_write:
                found.append(user)
            elif schema.returns and schema.returns[0].alias_info is not None:   # a view of it
                work.append(user)
    return found
