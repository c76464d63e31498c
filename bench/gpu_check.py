"""One device call: the core compiler on a GPU (verification of tiny models, decode throughput vs HF).

    python bench/gpu_check.py --out DIR

Real weights cannot travel to the GPU machine, so throughput uses SmolLM2-135M's shape with seeded
random weights; both systems run the same weights in bf16.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from hfrewrite.runtime.benchmark import run_benchmark
from hfrewrite.compiler.build import CompileOptions, compile_model
from hfrewrite.compiler.tiny import save_model, tiny_model

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                     pad_token_id=2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--models", default="llama,gemma2,qwen3")
    args = parser.parse_args()
    rows: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "verify": [], "bench": []}
    for model_type in args.models.split(","):
        for dtype in ("float32", "bfloat16"):
            start = time.perf_counter()
            result = compile_model(f"tiny:{model_type}", CompileOptions(dtype=dtype, progress=False))
            v = result.verification
            rows["verify"].append({"model": f"tiny:{model_type}", "dtype": dtype, "passed": v.passed,
                                   "max_abs_err": v.max_abs_err, "top1": v.top1_agreement,
                                   "seconds": round(time.perf_counter() - start, 1)})
            print(rows["verify"][-1], flush=True)
    config = AutoConfig.for_model("llama", **SMOLLM2_SHAPE)
    with tempfile.TemporaryDirectory() as directory:
        save_model(tiny_model(config, seed=0), Path(directory))
        rows["bench"] = run_benchmark(directory, CompileOptions(dtype="bfloat16", progress=False), [1, 16], 64, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    print("| check | dtype | result |")
    print("|---|---|---|")
    for r in rows["verify"]:
        print(f"| verify {r['model']} | {r['dtype']} | passed={r['passed']} max_abs_err={r['max_abs_err']:.2e} "
              f"top1={r['top1']:.3f} ({r['seconds']}s) |")
    for r in rows["bench"]:
        print(f"| bench smollm2-shape batch {r['batch']} | {r['dtype']} | HF {r['hf_tok_s']} tok/s, hfrewrite "
              f"{r['hfrewrite_tok_s']} tok/s, {r['speedup']}x (compile+warmup {r['compile_s']}s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
