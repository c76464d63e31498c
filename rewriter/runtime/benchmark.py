"""Side-by-side decode throughput: hfrewrite against transformers' own generate, eager and static-cache.

Same weights, same random prompts, greedy, every request forced to the full number of new tokens. Each
system is timed twice per batch size, for 1 new token (the prefill) and for all of them; decode tokens/s is
batch * (new_tokens - 1) / (full - prefill). The weights-bandwidth limit of batch-1 decode is the copy
bandwidth measured in the same run over the weight bytes: its fraction says how close a system gets.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from hfrewrite.compiler.build import build, reference_model
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.runtime.generation import Generator
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams

BASELINES = ("eager", "static")


@dataclass
class BenchRow:
    """One system at one batch size."""

    system: str
    batch: int
    prompt_len: int
    new_tokens: int
    decode_tok_s: float
    total_tok_s: float
    limit_fraction: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device).synchronize()


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written), best of 5."""
    nbytes = nbytes or (2**30 if device.type != "cpu" else 2**28)
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(timed_call(lambda: target.copy_(source), device) for _ in range(5))
    return 2 * nbytes / best


def weight_bytes(module: torch.nn.Module) -> int:
    """Distinct parameter bytes (tied weights once)."""
    storages = {p.untyped_storage().data_ptr(): p.numel() * p.element_size() for p in module.parameters()}
    return sum(storages.values())


def decode_rate(generate: Callable[[int], object], batch: int, new_tokens: int, device: torch.device,
                ) -> tuple[float, float]:
    """(decode tok/s, total tok/s) of `generate(n_new)` for one batch."""
    prefill = timed_call(lambda: generate(1), device)
    full = timed_call(lambda: generate(new_tokens), device)
    decode = batch * (new_tokens - 1) / max(full - prefill, 1e-9)
    return decode, batch * new_tokens / full


def hf_generate(reference: torch.nn.Module, ids: torch.Tensor, static: bool) -> Callable[[int], object]:
    extra = {"cache_implementation": "static"} if static else {}

    def run(new: int) -> object:
        return reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, **extra)
    return run


@torch.no_grad()
def compare(model: object, reference: torch.nn.Module | None, batch_sizes: Sequence[int], prompt_len: int,
            new_tokens: int, baselines: Sequence[str] = BASELINES, seed: int = 0,
            progress: Callable[[str], None] | None = None, generator_type: type = Generator) -> dict:
    """Every system at every batch size, on the same prompts; the rows and the run's bandwidth facts.

    `reference` None: hfrewrite alone (a pipeline's driver, whose weights are spread over the stages)."""
    device = model.device
    vocab = int(model.config.vocab_size)
    prompts = torch.randint(0, vocab, (max(batch_sizes), prompt_len), generator=torch.Generator().manual_seed(seed))
    block = 16
    cache = CacheConfig(block, -(-(prompt_len + new_tokens) // block) * max(batch_sizes) + 1)
    generator = generator_type(model, None, cache, max_tokens_per_step=max(512, prompt_len * max(batch_sizes)))
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes(reference) if reference is not None else 0
    limit = bandwidth / weights if weights else None
    rows: list[BenchRow] = []

    def ours(batch: int) -> Callable[[int], object]:
        return lambda new: generator.generate_ids(prompts[:batch].tolist(),
                                                  SamplingParams(max_new_tokens=new, ignore_eos=True))

    systems: list[tuple[str, Callable[[int], Callable[[int], object]]]] = [("hfrewrite", ours)]
    for name in baselines if reference is not None else ():
        systems.append((f"hf_{name}", lambda batch, static=(name == "static"):
                        hf_generate(reference, prompts[:batch].to(device), static)))
    for name, make in systems:
        for batch in batch_sizes:
            run = make(batch)
            run(2)  # warm: compiles and captures what the timed runs will see
            if name == "hf_static":  # its cache is sized by the request: warm both timed sizes
                run(1)
                run(new_tokens)
            decode, total = decode_rate(run, batch, new_tokens, device)
            rows.append(BenchRow(name, batch, prompt_len, new_tokens, round(decode, 1), round(total, 1),
                                 round(decode / limit, 3) if batch == 1 and limit else None))
            if progress:
                progress(f"{name} batch {batch}: {decode:.1f} decode tok/s")
    return {"device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_mb": round(weights / 1e6, 1),
            "limit_b1_tok_s": round(limit, 1) if limit else None, "rows": [r.to_dict() for r in rows]}


def run_benchmark(model_id: str, options: CompileOptions, batch_sizes: Sequence[int], prompt_len: int,
                  new_tokens: int, baselines: Sequence[str] | None = None, seed: int = 0) -> dict:
    """`hfrewrite bench`: compile (timed: capture, rewrite, load, compile, device graphs), then compare."""
    source = resolve(model_id, progress=options.progress)
    options.verify = False
    start = time.perf_counter()
    result = build(source, options)
    model = result.model
    compile_s = time.perf_counter() - start
    reference = reference_model(source, model.device, model.dtype, progress=options.progress)
    if baselines is None:
        baselines = BASELINES if model.device.type != "cpu" else ("eager",)
    report = compare(model, reference, batch_sizes, prompt_len, new_tokens, baselines, seed)
    report.update({"model": model_id, "compile_s": round(compile_s, 1), "timings": result.timings})
    return report


def format_table(report: dict) -> str:
    """A markdown table: decode tok/s per system and batch, and the batch-1 fraction of the limit."""
    batches = sorted({row["batch"] for row in report["rows"]})
    systems = list(dict.fromkeys(row["system"] for row in report["rows"]))
    lines = [f"{report.get('model', '')} on {report['device']} ({report['dtype']}); copy bandwidth "
             f"{report['copy_bandwidth_gb_s']} GB/s, weights {report['weight_mb']} MB, batch-1 limit "
             f"{report['limit_b1_tok_s']} tok/s; compile {report.get('compile_s', '-')} s",
             "| system | " + " | ".join(f"b{b} decode tok/s" for b in batches) + " | b1 / limit |",
             "|---|" + "---|" * (len(batches) + 1)]
    for system in systems:
        mine = {row["batch"]: row for row in report["rows"] if row["system"] == system}
        fraction = mine.get(1, {}).get("limit_fraction")
        lines.append(f"| {system} | " + " | ".join(str(mine[b]["decode_tok_s"]) if b in mine else "-" for b in batches)
                     + f" | {fraction if fraction is not None else '-'} |")
    return "\n".join(lines)
