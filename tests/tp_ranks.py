"""Shared part of the real-process (gloo) TP tests: what one rank records per case, and the check over all ranks.

A rank compiles the case sharded over WORLD_SIZE ranks (weights sliced by its own slicer, as load_weights does)
and records its logits of one packed prefill step and its greedy tokens; rank 0 also builds the model on one
device and runs HF eager. `check_case` then wants equal logits and tokens on every rank, equal (1e-4) to one
device's and HF eager's, and rank 0's verification passed. The worker functions stay in their test modules
(spawn pickles them by their importable names); they call `record_case` per case.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

PROMPTS = [[5, 17, 3, 99, 42, 7, 1], [8, 200, 31]]
NEW_TOKENS = 6


def sliced_weights(model: torch.nn.Module) -> Any:
    """A weight provider reading an in-memory HF model; under tp each tensor goes through the rank's slicer."""
    state = model.state_dict()

    def provide(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype, slicer: Any = None) -> dict:
        def read(name: str) -> torch.Tensor:
            tensor = state[name if name in state else tied[name]]
            return (slicer(name, tensor) if slicer is not None else tensor).to(device, dtype)

        return {name: read(name) for name in specs}

    return provide


def step_logits(model: Any) -> torch.Tensor:
    """Logits of every token of one packed prefill step of PROMPTS."""
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.step import Chunk, pack

    cache = model.new_cache(CacheConfig(block_size=4, num_blocks=8))
    step = pack([Chunk(PROMPTS[0], 0, [0, 1]), Chunk(PROMPTS[1], 0, [2])], 4, model.device)
    return model.forward(step, cache, rows=torch.arange(step.input_ids.shape[1])).float()


def greedy(model: Any) -> list[list[int]]:
    """Greedy tokens of the compiled model for PROMPTS, NEW_TOKENS each."""
    from hfrewrite.runtime.generation import Generator
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams

    generator = Generator(model, None, CacheConfig(block_size=4, num_blocks=16))
    return generator.generate_ids(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


def hf_greedy(reference: torch.nn.Module, prompt: list[int]) -> list[int]:
    """Greedy tokens from HF eager full forwards (no cache, no generate() extras), NEW_TOKENS of them."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(reference(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def record_case(out_dir: str, name: str, config: PretrainedConfig, backend: str | None = None,
                ep: bool = False) -> None:
    """This rank's record of case `name` (see the module docstring), saved as OUT_DIR/NAME-rankR.pt."""
    from hfrewrite.compiler.build import CompileOptions, build_compiled
    from hfrewrite.compiler.tiny import tiny_model
    from hfrewrite.compiler.verify import verify

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    reference = tiny_model(config, seed=1)
    options = CompileOptions(backend=backend, verify=False, progress=False, device="cpu", tp=world, ep=ep)
    model, report = build_compiled(config, sliced_weights(reference), options, {})
    result: dict[str, Any] = {"applied": report.applied, "kv_heads": [spec.kv_heads for spec in model.kv_specs],
                              "logits": step_logits(model), "tokens": greedy(model)}
    verification = verify(model, reference if rank == 0 else None, seed=3)
    if rank == 0:
        single, _ = build_compiled(config, sliced_weights(reference), dataclasses.replace(options, tp=1, ep=False), {})
        with torch.no_grad():
            hf_logits = [reference(input_ids=torch.tensor([prompt])).logits[0] for prompt in PROMPTS]
        result |= {"verify": dataclasses.asdict(verification), "single_logits": step_logits(single),
                   "single_tokens": greedy(single), "hf_logits": torch.cat(hf_logits),
                   "hf_tokens": [hf_greedy(reference, prompt) for prompt in PROMPTS]}
    torch.save(result, Path(out_dir) / f"{name}-rank{rank}.pt")


def load_case(out_dir: Path, name: str, world: int) -> list[dict]:
    """Every rank's record of case `name`, rank order."""
    return [torch.load(out_dir / f"{name}-rank{rank}.pt") for rank in range(world)]


def check_case(results: list[dict], name: str) -> None:
    """Rank 0 verified; every rank has rank 0's logits and tokens; those equal one device's and HF eager's."""
    first = results[0]
    assert first["verify"]["passed"], (name, first["verify"])
    for rank, other in enumerate(results[1:], start=1):
        assert torch.equal(other["logits"], first["logits"]), f"{name}: rank {rank} logits differ from rank 0"
        assert other["tokens"] == first["tokens"], f"{name}: rank {rank} tokens differ from rank 0"
    torch.testing.assert_close(first["logits"], first["single_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first["logits"], first["hf_logits"], atol=1e-4, rtol=1e-4)
    assert first["tokens"] == first["single_tokens"] == first["hf_tokens"], name
