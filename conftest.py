"""Repository-wide pytest setup.

Triton reads TRITON_INTERPRET when it is first imported; several test modules import the kernels,
so the interpreter switch must be set before any of them is collected (CPU-only machines).
"""
import os

import torch

if not torch.accelerator.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
