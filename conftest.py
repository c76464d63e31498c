"""Repository-wide pytest setup.

Triton reads TRITON_INTERPRET when it is first imported; several test modules import the kernels,
so the interpreter switch must be set before any of them is collected (CPU-only machines).
Inductor compiles in-process: on a 2-core CI machine a pool of compile workers (one more per spawned
rank) costs memory and start-up time and buys nothing.
"""
import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

if not torch.accelerator.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
