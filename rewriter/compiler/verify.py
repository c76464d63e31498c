"""Verification: the compiled, rewritten model against HF eager on random batches of mixed lengths.

Each sequence is fed in pieces (a prefill chunk, the rest of the prompt, then single decode tokens),
and every step packs the next piece of every sequence, so one forward mixes prefill and decode of
different sequences; the logits of every token are compared with HF's full-sequence eager forward.

It must not be foolable: any NaN/Inf logit fails (naming the side); in fp32 the error must be within
an absolute tolerance and within a fraction of the logits' scale (tiny logits make an absolute bound
meaningless); in half precision an fp32 oracle (HF eager, the same rounded weights upcast) is the
truth, and hfrewrite's error against it may be at most a small multiple of HF-half's own error on the
same inputs. When the model has a sliding window, one sequence is longer than the window.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from hfrewrite.compiler.decoder_check import require_causal_lm
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.runtime.step import Chunk, pack
from hfrewrite.runtime.kv_cache import BlockAllocator, CacheConfig

FP32_ATOL = 2e-3
FP32_RTOL = 1e-3       # of the largest |logit| of the reference
HALF_ERROR_RATIO = 3.0  # hfrewrite's error vs the fp32 oracle, as a multiple of HF-half's own
HALF_MIN_TOP1 = 0.9     # top-1 agreement with HF at the same dtype (reported, and a floor)
LONG_CAP = 1024         # the longest sequence drawn to cross a sliding window (real windows are longer)


@dataclass
class VerifyResult:
    """How close the compiled model came to HF eager (and, in half precision, to the fp32 oracle)."""

    passed: bool
    max_abs_err: float
    top1_agreement: float
    max_logprob_err: float
    tokens_compared: int
    sequences: int
    atol: float
    min_top1: float
    reason: str | None = None            # why it failed, in words
    tolerance: float | None = None       # the bound max_abs_err was held to (fp32: min(atol, rtol * scale))
    logit_scale: float | None = None     # largest |logit| of the reference
    oracle_err: float | None = None      # half precision: hfrewrite's mean |err| vs the fp32 oracle
    reference_oracle_err: float | None = None  # half precision: HF-half's mean |err| vs the same oracle
    longest: int = 0                     # the longest sequence (crosses the sliding window, when there is one)

    def to_dict(self) -> dict:
        return asdict(self)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(absolute logit tolerance, minimum top-1 agreement): tight in fp32, oracle-ratio based in half precision."""
    if dtype == torch.float32:
        return FP32_ATOL, 1.0
    return float("inf"), HALF_MIN_TOP1


def sliding_window(config: object) -> int | None:
    """The model's sliding attention window, if it has one in use."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False or not isinstance(window, int) or window <= 0:
        return None
    return window


def draw_lengths(generator: torch.Generator, sequences: int, min_len: int, max_len: int, window: int | None,
                 context: int, decode_steps: int) -> list[int]:
    """Random lengths; with a window, the first one crosses it (capped at LONG_CAP and the context)."""
    lengths = [int(x) for x in torch.randint(min_len, max_len + 1, (sequences,), generator=generator)]
    if window is not None and sequences > 0:
        lengths[0] = max(lengths[0], min(2 * window + decode_steps + 1, LONG_CAP, context))
    return lengths


def draw_pieces(lengths: list[int], generator: torch.Generator, decode_steps: int) -> list[list[int]]:
    """Split each length into a prefill chunk, the rest of the prompt, and `decode_steps` single tokens."""
    pieces = []
    for length in lengths:
        decodes = min(decode_steps, length - 1)
        prompt = length - decodes
        first = int(torch.randint(1, prompt + 1, (1,), generator=generator))
        parts = [first] + ([prompt - first] if prompt > first else []) + [1] * decodes
        pieces.append(parts)
    return pieces


def _run_compiled(compiled: CompiledModel, prompts: list[torch.Tensor], pieces: list[list[int]],
                  block_size: int) -> list[torch.Tensor]:
    """Every token's logits [n, V] per sequence, from packed, chunked, paged steps."""
    lengths = [len(p) for p in prompts]
    cache_config = CacheConfig(block_size=block_size, num_blocks=sum(-(-n // block_size) for n in lengths) + 2)
    cache = compiled.new_cache(cache_config)
    allocator = BlockAllocator(cache_config.num_blocks)
    blocks = [allocator.allocate(cache_config.blocks_for(n)) for n in lengths]
    cursor = [0] * len(prompts)
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    while any(pieces):
        active = [i for i in range(len(prompts)) if pieces[i]]
        chunks = []
        for i in active:
            size = pieces[i].pop(0)
            chunks.append(Chunk(prompts[i][cursor[i]:cursor[i] + size].tolist(), cursor[i], blocks[i]))
            cursor[i] += size
        step = pack(chunks, block_size, compiled.device)
        rows = torch.arange(step.input_ids.shape[1], device=compiled.device)
        logits = compiled.forward(step, cache, rows=rows).float().cpu()
        offset = 0
        for i, chunk in zip(active, chunks):
            got[i].append(logits[offset:offset + len(chunk.tokens)])
            offset += len(chunk.tokens)
    return [torch.cat(parts) for parts in got]


def _logits(model: torch.nn.Module, prompt: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(input_ids=prompt[None].to(device)).logits[0].float().cpu()


def _non_finite(side: str, tensors: list[torch.Tensor]) -> str | None:
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
    total = sum(t.numel() for t in tensors)
    return f"{side} logits are not finite ({bad} of {total} values NaN or Inf)" if bad else None


@torch.no_grad()
def verify(compiled: CompiledModel, reference: torch.nn.Module | None, *, seed: int = 0, sequences: int = 3,
           min_len: int = 3, max_len: int = 24, decode_steps: int = 3, block_size: int = 4,
           atol: float | None = None, rtol: float = FP32_RTOL, half_ratio: float = HALF_ERROR_RATIO) -> VerifyResult | None:
    """Compare every token's logits of packed, chunked, paged runs with HF eager full-sequence logits.

    `reference` is HF eager at the compiled model's dtype. Under tensor parallelism every rank must run
    the same forwards (they meet in collectives), but only one needs the reference: the others pass
    None and get None.
    """
    require_causal_lm(compiled.config, "the model")
    generator = torch.Generator().manual_seed(seed)
    vocab = int(compiled.config.vocab_size)
    lengths = draw_lengths(generator, sequences, min_len, max_len, sliding_window(compiled.config),
                           compiled.max_context, decode_steps)
    prompts = [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]
    ours = _run_compiled(compiled, prompts, draw_pieces(lengths, generator, decode_steps), block_size)
    if reference is None:
        return None
    theirs = [_logits(reference, prompt, compiled.device) for prompt in prompts]
    default_atol, min_top1 = tolerances(compiled.dtype)
    atol = default_atol if atol is None else atol
    total = sum(o.shape[0] for o in ours)
    result = VerifyResult(False, float("inf"), 0.0, float("inf"), total, sequences, atol, min_top1,
                          longest=max(lengths, default=0))
    problems = [p for p in (_non_finite("the compiled model's", ours), _non_finite("HF eager's (reference)", theirs))
                if p]
    if problems:
        result.reason = "; ".join(problems)
        return result
    result.max_abs_err = max(float((o - t).abs().max()) for o, t in zip(ours, theirs))
    result.max_logprob_err = max(float((torch.log_softmax(o, -1) - torch.log_softmax(t, -1)).abs().max())
                                 for o, t in zip(ours, theirs))
    result.top1_agreement = sum(int((o.argmax(-1) == t.argmax(-1)).sum()) for o, t in zip(ours, theirs)) / total
    result.logit_scale = max(float(t.abs().max()) for t in theirs)
    failures = []
    if compiled.dtype == torch.float32:
        result.tolerance = min(atol, rtol * result.logit_scale) if result.logit_scale > 0 else atol
        if result.max_abs_err > result.tolerance:
            failures.append(f"max |logit err| {result.max_abs_err:.2e} is over {result.tolerance:.1e} "
                            f"(min of atol {atol:.0e} and {rtol:.0e} x the logits' scale {result.logit_scale:.2e})")
    else:
        failures += _half_precision(result, reference, prompts, ours, theirs, compiled.device, half_ratio)
        if result.max_abs_err > atol:
            failures.append(f"max |logit err| {result.max_abs_err:.2e} is over atol {atol:.0e}")
    if result.top1_agreement < min_top1:
        failures.append(f"top-1 agreement {result.top1_agreement:.3f} is under {min_top1}")
    result.passed = not failures
    result.reason = "; ".join(failures) or None
    return result


def _half_precision(result: VerifyResult, reference: torch.nn.Module, prompts: list[torch.Tensor],
                    ours: list[torch.Tensor], theirs: list[torch.Tensor], device: torch.device,
                    ratio: float) -> list[str]:
    """Bound hfrewrite's error against an fp32 oracle by `ratio` x HF-half's own error on the same inputs."""
    oracle_model = copy.deepcopy(reference).float()
    oracle = [_logits(oracle_model, prompt, device) for prompt in prompts]
    del oracle_model
    problem = _non_finite("the fp32 oracle's", oracle)
    if problem:
        return [problem]
    count = sum(o.numel() for o in oracle)
    result.oracle_err = sum(float((o - r).abs().sum()) for o, r in zip(ours, oracle)) / count
    result.reference_oracle_err = sum(float((t - r).abs().sum()) for t, r in zip(theirs, oracle)) / count
    floor = float(torch.finfo(torch.float32).eps) * max(float(r.abs().max()) for r in oracle)
    bound = ratio * result.reference_oracle_err + floor
    result.tolerance = bound
    if result.oracle_err > bound:
        return [f"mean |logit err| against the fp32 oracle {result.oracle_err:.3e} is over {ratio:g} x HF "
                f"eager's own in this dtype ({result.reference_oracle_err:.3e})"]
    return []
