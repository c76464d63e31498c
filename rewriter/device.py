"""Device selection: the only place that knows accelerator names."""
from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """Return the requested device, or the best available accelerator, or the CPU."""
    if requested:
        from hfrewrite.errors import HfRewriteError

        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise HfRewriteError(f"--device {requested!r} is not a torch device ({error}); use cpu, cuda, "
                                 f"cuda:1, ...") from error
        if device.type != "cpu" and not (torch.accelerator.is_available()
                                         and torch.accelerator.current_accelerator().type == device.type):
            raise HfRewriteError(f"--device {requested!r}: no {device.type} device is available on this machine")
        return device
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is not None and torch.accelerator.is_available():
        return torch.device(accelerator.type)
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU (exact verification, fast sgemm); bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Map a CLI dtype name to a torch dtype; None picks the device default."""
    if name is None or name == "auto":
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        from hfrewrite.errors import HfRewriteError

        raise HfRewriteError(f"unknown --dtype {name!r}; choose one of {', '.join(sorted(table))}")
    return table[name]


def device_name(device: torch.device) -> str:
    """The chip's name for an accelerator (tuned configs do not carry over between chips), else the type."""
    if device.type == "cpu":
        return "cpu"
    module = torch.get_device_module(device)
    name = getattr(module, "get_device_name", None)
    return str(name(device)) if callable(name) else device.type


def capturing_graph(device: torch.device) -> bool:
    """Whether the current stream of `device` is being captured into a graph (nothing may sync then)."""
    if device.type == "cpu":
        return False
    check = getattr(torch.get_device_module(device), "is_current_stream_capturing", None)
    return bool(check()) if callable(check) else False
