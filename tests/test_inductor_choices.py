"""The GPU inductor choices: an RMSNorm over a 2048-wide row compiles to one kernel and computes the same."""
from __future__ import annotations

import contextlib

import pytest
import torch

from hfrewrite.runtime.inductor_choices import ROWS_VARIABLE, gpu_choices, persistent_row_limit


def test_the_row_limit_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROWS_VARIABLE, "4096")
    assert persistent_row_limit() == 4096
    monkeypatch.setenv(ROWS_VARIABLE, "lots")
    with pytest.raises(ValueError, match=ROWS_VARIABLE):
        persistent_row_limit()


def test_nothing_changes_on_the_cpu_or_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(gpu_choices("cpu"), contextlib.nullcontext)
    monkeypatch.setenv(ROWS_VARIABLE, "0")
    assert isinstance(gpu_choices("cuda"), contextlib.nullcontext)


def residual_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual add and the next norm: the sum is an output too (the next residual)."""
    total = x + residual
    hidden = total.float()
    return total, (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight


@pytest.mark.skipif(not torch.accelerator.is_available(), reason="inductor's Triton kernels need a GPU")
def test_a_wide_norm_is_one_kernel_and_equal() -> None:
    from torch._inductor.utils import run_and_get_code

    device = torch.accelerator.current_accelerator().type
    x, residual = (torch.randn(3, 2048, device=device, dtype=torch.bfloat16) for _ in range(2))
    weight = torch.randn(2048, device=device, dtype=torch.bfloat16)
    want = residual_rms_norm(x.float(), residual.float(), weight.float())
    counts = {}
    for name, choices in (("default", contextlib.nullcontext()), ("wide", gpu_choices(device))):
        torch._dynamo.reset()
        with choices:
            got, code = run_and_get_code(torch.compile(residual_rms_norm, dynamic=True), x, residual, weight)
        counts[name] = sum(text.count("@triton.jit") for text in code)
        torch.testing.assert_close(got[1].float(), want[1], atol=0.05, rtol=0.02)
        torch.testing.assert_close(got[0].float(), want[0], atol=0.02, rtol=0.01)
    assert counts["wide"] == 1 and counts["default"] >= counts["wide"], counts
