"""Side-by-side throughput: hfrewrite's compiled, paged model against transformers' own generate.

Same weights, same random prompts, greedy, every request forced to the full number of new tokens.
Reported as generated tokens per second of wall time (prefill included, for both) and the ratio.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from hfrewrite.runtime.generation import Generator
from hfrewrite.compiler.build import CompileOptions, build, reference_model
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams
from hfrewrite.compiler.sources import resolve


@dataclass
class BenchRow:
    """One batch size: both systems' tokens/s and their ratio."""

    model: str
    batch: int
    prompt_len: int
    new_tokens: int
    hf_tok_s: float
    hfrewrite_tok_s: float
    speedup: float
    compile_s: float
    device: str
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def run_benchmark(model_id: str, options: CompileOptions, batch_sizes: Sequence[int], prompt_len: int,
                  new_tokens: int, seed: int = 0) -> list[dict]:
    source = resolve(model_id, progress=options.progress)
    options.verify = False
    start = time.perf_counter()
    result = build(source, options)
    model = result.model
    block_size = 16
    per_seq = -(-(prompt_len + new_tokens) // block_size)
    cache = CacheConfig(block_size, per_seq * max(batch_sizes) + 1)
    generator = Generator(model, None, cache, max_tokens_per_step=max(512, prompt_len * max(batch_sizes)))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    warm = torch.randint(0, int(model.config.vocab_size), (max(batch_sizes), prompt_len), generator=torch.Generator().manual_seed(seed + 1))
    for batch in sorted(set(batch_sizes)):  # compile every shape the timed runs will see
        generator.generate_ids(warm[:batch].tolist(), SamplingParams(max_new_tokens=3, ignore_eos=True))
    compile_s = time.perf_counter() - start
    reference = reference_model(source, model.device, model.dtype)
    prompts = torch.randint(0, int(model.config.vocab_size), (max(batch_sizes), prompt_len),
                            generator=torch.Generator().manual_seed(seed))
    rows = []
    for batch in batch_sizes:
        ids = prompts[:batch].to(model.device)
        hf_s = _time(lambda: reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False))
        ours_s = _time(lambda: generator.generate_ids(prompts[:batch].tolist(), params))
        hf_rate, our_rate = batch * new_tokens / hf_s, batch * new_tokens / ours_s
        rows.append(BenchRow(model_id, batch, prompt_len, new_tokens, round(hf_rate, 2), round(our_rate, 2),
                             round(our_rate / hf_rate, 2), round(compile_s, 1), str(model.device),
                             str(model.dtype).replace("torch.", "")).to_dict())
    return rows
