"""A vision-language model on the GPU: hfrewrite against HF eager on one image prompt per sequence.

The shape is Qwen2-VL-2B's (text: hidden 1536, 28 layers, 12 query / 2 KV heads, vocab 151936; vision: 32
blocks of width 1280), random bf16 weights made on the device, saved once with the tiny family's offline
processor (byte tokenizer, the Pillow image processor with the real patch size 14). Reports, side by side
in one run: the vision tower's time for one 448 x 448 image (256 image tokens after merging), time to the
first token of a batch (tower + prefill), and decode tokens/s (full run minus the first-token run), for
hfrewrite (compiled tower, paged LM through the Engine) and HF `generate` (sdpa attention, dynamic cache).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLImageProcessorPil

from hfrewrite.compiler.build import build
from hfrewrite.compiler.options import CompileOptions
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.tiny import save_model
from hfrewrite.compiler.tiny_vision import QWEN_TEMPLATE, SPECIAL, BYTES, byte_tokenizer, save_processor_parts
from hfrewrite.compiler.vision import load_processor
from hfrewrite.compiler.vision_verify import random_image
from hfrewrite.device import pick_device
from hfrewrite.runtime import multimodal
from hfrewrite.runtime.kv_cache import CacheConfig
from hfrewrite.runtime.sampling import SamplingParams


def token(name: str) -> int:
    return BYTES + SPECIAL.index(name)


SMOKE = dict(text=dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
             vision=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4))


def qwen2_vl_2b_config(smoke: bool = False) -> AutoConfig:
    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"),
                pad_token_id=token("<|endoftext|>"))
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if smoke:  # a check of this script on the CPU, not a measurement
        text.update(SMOKE["text"])
        vision.update(SMOKE["vision"])
    return AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=vision,
                                image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
                                vision_start_token_id=token("<|vision_start|>"),
                                vision_end_token_id=token("<|vision_end|>"), tie_word_embeddings=True)


def write_model(directory: Path, device: torch.device, smoke: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        reference = AutoModelForImageTextToText.from_config(qwen2_vl_2b_config(smoke), dtype=dtype_of(smoke),
                                                            attn_implementation="sdpa").eval()
    save_model(reference, directory)
    side = 56 if smoke else 448
    images = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                      min_pixels=side * side, max_pixels=side * side)
    save_processor_parts(directory, images, byte_tokenizer(), QWEN_TEMPLATE)
    return reference


def dtype_of(smoke: bool) -> torch.dtype:
    return torch.float32 if smoke else torch.bfloat16


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    module = torch.get_device_module(device)
    module.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    module.synchronize()
    return (time.perf_counter() - start) / repeats


def graph_replays(engine: object) -> int:
    """Decode steps the engine's VLM runner has replayed from CUDA graphs so far (0 without graphs)."""
    graphs = engine.executor.forward.graphs
    return 0 if graphs is None else graphs.replays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on the CPU")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode steps uncaptured (the A/B of graphs)")
    args = parser.parse_args()
    device = pick_device(None)
    directory = Path(tempfile.mkdtemp(prefix="vlm-2b-"))
    reference = write_model(directory, device, args.smoke)
    start = time.perf_counter()
    result = build(resolve(str(directory), progress=False),
                   CompileOptions(dtype=str(dtype_of(args.smoke)).removeprefix("torch."), verify=False, progress=False, device=device.type,
                                  device_graphs=not args.no_cuda_graphs))
    compile_s = time.perf_counter() - start
    model = result.model
    processor = load_processor(directory, model.config)
    rng = np.random.default_rng(0)
    prompt = multimodal.processor_inputs(processor, [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "describe the picture"}]}], [random_image(rng, 56 if args.smoke else 448, 56 if args.smoke else 448)])
    prompt_len = int(prompt["input_ids"].shape[1])
    on_device = {k: v.to(device) for k, v in prompt.items()}
    pixels, grid = on_device["pixel_values"].to(dtype_of(args.smoke)), on_device["image_grid_thw"]
    with torch.no_grad():
        model.vision.image_features(pixels, image_grid_thw=grid)   # compile the tower
        ours_tower = timed(lambda: model.vision.image_features(pixels, image_grid_thw=grid), device, 5)
        reference.model.get_image_features(pixels, image_grid_thw=grid)
        hf_tower = timed(lambda: reference.model.get_image_features(pixels, image_grid_thw=grid), device, 5)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        blocks = -(-(prompt_len + args.new_tokens) // 16) * batch + 1

        engines = []

        def ours(new: int) -> None:
            engine = multimodal.vision_engine(model, CacheConfig(16, blocks), max_tokens_per_step=prompt_len * batch)
            engines.append(engine)
            requests = [multimodal.vision_request(model.vision, prompt, SamplingParams(max_new_tokens=new,
                                                                                       ignore_eos=True))
                        for _ in range(batch)]
            for event in engine.run(requests):
                if event.error is not None:
                    raise event.error

        batched = {k: torch.cat([v] * batch) for k, v in on_device.items()}

        def hf(new: int) -> None:
            with torch.no_grad():
                reference.generate(**batched, max_new_tokens=new, min_new_tokens=new, do_sample=False)

        row = {"batch": batch, "prompt_tokens": prompt_len}
        for name, run in (("hfrewrite", ours), ("hf_eager", hf)):
            run(2)   # warm (hfrewrite: the first engine of this cache config captures its decode graphs)
            first = timed(lambda: run(1), device)
            replays = graph_replays(engines[-1]) if name == "hfrewrite" else 0
            full = timed(lambda: run(args.new_tokens), device)
            row[name] = {"first_token_ms": round(first * 1000, 1), "prefill_tok_s": round(batch * prompt_len / first, 1),
                         "decode_tok_s": round(batch * (args.new_tokens - 1) / (full - first), 1)}
            if name == "hfrewrite":   # whether the timed decode steps replayed from CUDA graphs, and how many did
                graphs = engines[-1].executor.forward.graphs
                row[name]["decode_graphs"] = None if graphs is None else {
                    "buckets": sorted(graphs.graphs), "replays": graph_replays(engines[-1]) - replays,
                    "decode_steps": args.new_tokens - 1, "captures": graphs.captures}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"model": "qwen2_vl 2B shape", "compile_s": round(compile_s, 1), "timings": result.timings,
              "vision_tower_ms": {"hfrewrite": round(ours_tower * 1000, 2), "hf_eager": round(hf_tower * 1000, 2)},
              "device_graphs": model.graph_reports(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_vlm.json").write_text(json.dumps(report, indent=2))
    name = torch.get_device_module(device).get_device_name() if device.type != "cpu" else "cpu"
    print(f"\n{name}, torch {torch.__version__}; qwen2_vl 2B shape, one 448x448 image ({prompt_len} prompt tokens), "
          f"{args.new_tokens} new tokens; compile {compile_s:.1f} s")
    print(f"vision tower ms: hfrewrite {report['vision_tower_ms']['hfrewrite']}, HF {report['vision_tower_ms']['hf_eager']}")
    print("| batch | first token ms (ours / HF) | prefill tok/s (ours / HF) | decode tok/s (ours / HF) | our decode |")
    for row in rows:
        a, b = row["hfrewrite"], row["hf_eager"]
        graphs = a["decode_graphs"]
        replayed = "eager" if graphs is None else f"{graphs['replays']}/{graphs['decode_steps']} steps from CUDA graphs"
        print(f"| {row['batch']} | {a['first_token_ms']} / {b['first_token_ms']} | {a['prefill_tok_s']} / "
              f"{b['prefill_tok_s']} | {a['decode_tok_s']} / {b['decode_tok_s']} | {replayed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
