"""Repository-wide pytest setup.

Triton reads TRITON_INTERPRET when it is first imported; several test modules import the kernels,
so the interpreter switch must be set before any of them is collected (CPU-only machines).
Inductor compiles in-process: on a 2-core CI machine a pool of compile workers (one more per spawned
rank) costs memory and start-up time and buys nothing.
Under pytest-xdist (`make test PYTEST_ARGS="-n 2 --dist loadfile"`) each worker takes its share of the cores for torch's
intra-op threads, as a spawned rank does: two workers of two threads each on two cores only contend.
"""
import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

if not torch.accelerator.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
