"""A failed capture names the module it failed in; a layer reading the (absent) attention mask gets its own message."""
from __future__ import annotations

import pytest
import torch

from hfrewrite.compiler.capture import capture
from hfrewrite.compiler.capture_blame import explain_failure, failure_site
from hfrewrite.compiler.tiny import tiny_config
from hfrewrite.errors import CaptureError


class Inner(torch.nn.Module):
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None and x.shape[-1] == 3:
            return attention_mask[:, 0]  # what DeepSeek-V3.2's attention does with the mask hfrewrite never builds
        raise ValueError("width")


class Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Identity(), Inner()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](x))


def raised(model: torch.nn.Module, x: torch.Tensor) -> BaseException:
    with pytest.raises((TypeError, ValueError)) as caught:
        model(x)
    return caught.value


def test_the_innermost_module_is_named() -> None:
    model = Outer()
    error = raised(model, torch.randn(2, 5))
    site = failure_site(error, model)
    assert site is not None
    assert (site.path, site.class_name, site.none_masks) == ("blocks.1", "Inner", ("attention_mask",))
    assert explain_failure(error, model).startswith("width; in blocks.1 (Inner, test_capture_blame.py:")


def test_a_none_mask_is_explained() -> None:
    model = Outer()
    message = explain_failure(raised(model, torch.randn(2, 3)), model)
    assert message.startswith("blocks.1 (Inner, test_capture_blame.py:") and "uses attention_mask beyond" in message
    assert "does not support" in message and message.endswith("(TypeError: 'NoneType' object is not subscriptable)")


def test_a_failure_outside_the_model_names_nothing() -> None:
    with pytest.raises(TypeError) as caught:
        None[0]  # type: ignore[index]
    assert failure_site(caught.value, Outer()) is None
    assert explain_failure(caught.value, Outer()) == "'NoneType' object is not subscriptable"


def test_deepseek_sparse_attention_is_refused_naming_the_module() -> None:
    with pytest.raises(CaptureError, match=r"model\.layers\.0\.self_attn \(DeepseekV32Attention, modeling_deepseek_v32"
                                           r"\.py:\d+\) uses attention_mask beyond the attention .*does not support"):
        capture(tiny_config("deepseek_v32"))
