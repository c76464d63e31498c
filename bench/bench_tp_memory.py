"""Peak resident memory per rank under --tp N, from a sharded safetensors load (not a test).

    python bench/bench_tp_memory.py [--tp 1,2] [--model-type llama] [--hidden 1024] [--layers 8]

A larger tiny model (random weights, saved once as safetensors) is compiled with the eager backend on 1
and N spawned gloo ranks; each rank reports its parameter bytes and the growth of its peak resident set
(VmHWM) over what it held after imports, through capture, rewrite, the sliced load and one forward.
Near 1/N of the one-rank figure means each rank read only its slices.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from hfrewrite.parallel.distributed import launch


def resident_mb() -> float:
    """The current resident set (MB)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mb() -> float:
    """This process's peak resident set (VmHWM, MB). Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a spawned rank would report the launcher's peak (which held the whole random model)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def resident_split_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident MB now: mapped checkpoint pages count as file-backed, reclaimable."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    return fields["RssAnon"], fields["RssFile"]


def rank_worker(model_dir: str, out_dir: str, tp: int) -> int:
    """One rank: build the model from the checkpoint directory, run one step, report memory."""
    from hfrewrite.compiler.build import CompileOptions, build
    from hfrewrite.runtime.step import Chunk, pack
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.compiler.sources import resolve

    before = resident_mb()
    anon_before, _ = resident_split_mb()
    result = build(resolve(model_dir, progress=False),
                   CompileOptions(backend=None, verify=False, progress=False, device="cpu", tp=tp))
    model = result.model
    built_peak = peak_resident_mb()
    step = pack([Chunk(list(range(1, 17)), 0, [0])], 16, torch.device("cpu"))
    model.forward(step, model.new_cache(CacheConfig(16, 2)))
    peak = peak_resident_mb()
    anon, mapped = resident_split_mb()
    rank = int(os.environ.get("RANK", "0"))
    params = sum(p.numel() * p.element_size() for p in model.graph_module.parameters()) / 2**20
    Path(out_dir, f"tp{tp}-rank{rank}.json").write_text(json.dumps(
        {"tp": tp, "rank": rank, "param_mb": round(params, 1), "rss_after_imports_mb": round(before, 1),
         "peak_growth_mb": round(peak - before, 1), "built_peak_growth_mb": round(built_peak - before, 1), "anon_growth_mb": round(anon - anon_before, 1),
         "file_mapped_mb": round(mapped, 1)}))
    from hfrewrite.parallel import distributed

    distributed.finish()  # leave the process group before exiting
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    from hfrewrite.compiler.tiny import save_model, tiny_config, tiny_model

    config = tiny_config(args.model_type, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=args.hidden // 16, vocab_size=32000)
    with tempfile.TemporaryDirectory() as work:
        model_dir, out_dir = Path(work, "model"), Path(work, "out")
        out_dir.mkdir()
        save_model(tiny_model(config, seed=0), model_dir)
        rows = []
        for tp in [int(part) for part in args.tp.split(",")]:
            # a fresh process per rank, tp 1 included: VmHWM is a lifetime peak
            result = launch(tp, rank_worker, (str(model_dir), str(out_dir), tp), limit=600)
            if result.code:
                raise SystemExit(result.message)
            rows += [json.loads(path.read_text()) for path in sorted(out_dir.glob(f"tp{tp}-rank*.json"))]
    print("| tp | rank | parameters (MB) | peak RSS growth after load (MB) | after one step (MB) | anonymous RSS growth "
          "after the step (MB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tp']} | {row['rank']} | {row['param_mb']} | {row['built_peak_growth_mb']} | "
              f"{row['peak_growth_mb']} | {row['anon_growth_mb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
