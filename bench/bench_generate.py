"""Decode throughput of hfrewrite against transformers' generate, side by side in one run.

    python bench/bench_generate.py --model smollm2-135m [--batch-sizes 1,16] [--markdown BENCHMARKS.md]

Prints a table; with --markdown appends the rows (and the command) to that file.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import transformers

from hfrewrite.runtime.benchmark import run_benchmark
from hfrewrite.compiler.build import CompileOptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this path")
    args = parser.parse_args()
    options = CompileOptions(device=args.device, dtype=args.dtype, verify=False, progress=False)
    rows = run_benchmark(args.model, options, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len,
                         args.new_tokens)
    header = "| model | device | dtype | batch | prompt | new | HF generate tok/s | hfrewrite tok/s | speedup | compile+warmup s |"
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['prompt_len']} | "
                     f"{r['new_tokens']} | {r['hf_tok_s']} | {r['hfrewrite_tok_s']} | {r['speedup']}x | {r['compile_s']} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    if args.markdown:
        command = "python " + " ".join(sys.argv)
        env = (f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
        with open(args.markdown, "a") as handle:
            handle.write(f"\n`{command}` ({env})\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
