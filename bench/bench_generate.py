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
from hfrewrite.compiler.options import CompileOptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--baselines", default="eager", help="eager,static (transformers generate modes)")
    parser.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this path")
    args = parser.parse_args()
    options = CompileOptions(device=args.device, dtype=args.dtype, verify=False, progress=False)
    report = run_benchmark(args.model, options, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len,
                           args.new_tokens, baselines=tuple(b for b in args.baselines.split(",") if b))
    rows = report["rows"]
    header = ("| model | device | dtype | batch | prompt | new | system | decode tok/s | total tok/s (prefill incl.) "
              "| vs hf_eager decode / total | compile s |")
    lines = [header, "|" + "---|" * 11]
    hf = {r["batch"]: r for r in rows if r["system"] == "hf_eager"}
    for r in rows:
        base = hf.get(r["batch"])
        ratio = (f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x / {r['total_tok_s'] / base['total_tok_s']:.2f}x"
                 if base else "-")
        lines.append(f"| {report['model']} | {report['device']} | {report['dtype']} | {r['batch']} | {r['prompt_len']} | "
                     f"{r['new_tokens']} | {r['system']} | {r['decode_tok_s']} | {r['total_tok_s']} | {ratio} | "
                     f"{report['compile_s']} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.markdown:
        command = "python " + " ".join(sys.argv)
        env = (f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
        with open(args.markdown, "a") as handle:
            handle.write(f"\n`{command}` ({env})\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
