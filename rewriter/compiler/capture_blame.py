"""Which module of the model a failed capture failed in, read from the exception's traceback.

torch.export (non-strict) runs the model's own Python, so the innermost traceback frame whose `self` is one
of the model's modules names the module (its path and class) and the modeling file's line. The capture
error says so, and one failure gets its own message: a layer that reads the attention mask itself. The
attention marker builds no mask (the paged op masks by positions), so such a layer finds None; DeepSeek
sparse attention (DeepSeek-V3.2, GLM-MoE-DSA, HY-V4, AXK2, dots3) feeds the mask to its top-k key indexer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import TracebackType

import torch

MASK_NAMES = ("attention_mask", "mask", "causal_mask")


@dataclass(frozen=True)
class FailureSite:
    """The innermost module of the model whose code raised: path, class, modeling file and line, its mask locals."""

    path: str
    class_name: str
    file: str
    line: int
    none_masks: tuple[str, ...]  # the frame's mask variables that are None

    def __str__(self) -> str:
        return f"{self.path or '<top level>'} ({self.class_name}, {os.path.basename(self.file)}:{self.line})"


def _frames(traceback: TracebackType | None) -> list[TracebackType]:
    frames = []
    while traceback is not None:
        frames.append(traceback)
        traceback = traceback.tb_next
    return frames


def failure_site(error: BaseException, model: torch.nn.Module) -> FailureSite | None:
    """The innermost frame of `error`'s traceback running a module of `model`, or None (it failed elsewhere)."""
    paths = {id(module): path for path, module in model.named_modules()}
    for frame in reversed(_frames(error.__traceback__)):
        owner = frame.tb_frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in paths:
            local = frame.tb_frame.f_locals
            masks = tuple(name for name in MASK_NAMES if name in local and local[name] is None)
            return FailureSite(paths[id(owner)], type(owner).__name__, frame.tb_frame.f_code.co_filename,
                               frame.tb_lineno, masks)
    return None


def explain_failure(error: BaseException, model: torch.nn.Module) -> str:
    """The capture error's reason: the error's first line and where it failed, or what is not supported and where."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    site = failure_site(error, model)
    if site is None:
        return first
    if isinstance(error, TypeError) and "NoneType" in str(error) and site.none_masks:
        return (f"{site} uses {site.none_masks[0]} beyond the attention call (DeepSeek sparse attention's top-k key "
                f"indexer), which hfrewrite does not support: its attention builds no mask, the paged attention op "
                f"masks by positions ({type(error).__name__}: {first})")
    return f"{first}; in {site}"
