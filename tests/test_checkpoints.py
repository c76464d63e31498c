"""Checkpoints as transformers writes them (save_pretrained) load the way transformers loads them.

Every MoE type is saved by transformers' own `save_pretrained` (per-expert tensors, mixtral's
`block_sparse_moe.experts.N.w1`, granitemoe's `input_linear`), compiled from that directory and
verified against HF eager loaded from the same directory (fp32, 1e-4 abs on logits). Under tp 2 and
--ep the ranks are simulated (threads whose collectives meet in SimulatedGroup) and load from disk
through the slicer; every byte each rank reads is counted at the file reads, and each rank's share of
every experts tensor on disk is exactly its part (its experts under --ep, half of each expert's width
otherwise). Layouts: sharded with an index, tied embeddings, extra tensors, a bf16 checkpoint run in
fp32; a missing or mis-shaped weight is a WeightError naming it and the checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hfrewrite.compiler import file_slices
from hfrewrite.compiler.build import CompileOptions, build
from hfrewrite.compiler.load import install_weights, load_graph_weights
from hfrewrite.compiler.rewrite import KV_CACHES, rewrite
from hfrewrite.compiler.capture import capture, retarget_devices
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.tiny import tiny_config, tiny_model
from hfrewrite.compiler.verify import verify
from hfrewrite.compiler.weights import load_weights
from hfrewrite.engine.loader import shipped_rule_paths
from hfrewrite.errors import WeightError
from hfrewrite.parallel.sharding import SimulatedGroup, split_range
from hfrewrite.runtime.model import CompiledModel
from hfrewrite.parallel.layout import ParallelLayout

pytestmark = pytest.mark.timeout(600)

CPU = torch.device("cpu")
ATOL = 1e-4
MOE_TYPES = ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss", "olmoe", "phimoe", "granitemoe"]
DENSE_TYPES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "gpt2"]  # test_equivalence's
# types whose transformers checkpoint differs from the runtime names (the others already match)
CONVERTED = {"mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "olmoe", "phimoe", "granitemoe"}
SIZES: dict[str, Any] = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64,
                         "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
                         "n_group": 1, "topk_group": 1}


def saved(directory: Path, model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32,
          **save: Any) -> Path:
    """A tiny random model of `model_type`, written by transformers' save_pretrained (safetensors)."""
    model = tiny_model(tiny_config(model_type, **SIZES), seed)
    model.to(dtype).save_pretrained(directory, **save)
    return directory


def disk_names(directory: Path) -> dict[str, int]:
    """Every tensor on disk -> its size in bytes."""
    sizes = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                item = torch.empty((), dtype=file_slices.DTYPES[tensor.get_dtype()]).element_size()
                sizes[name] = math.prod(tensor.get_shape()) * item
    return sizes


def reference(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def compile_and_verify(directory: Path, seed: int = 0) -> Any:
    """tp 1: compile the directory (eager backend), verify against HF eager loaded from the same directory."""
    result = build(resolve(str(directory), progress=False),
                   CompileOptions(backend=None, device="cpu", dtype="float32", verify=False, progress=False))
    outcome = verify(result.model, reference(directory), seed=seed, atol=ATOL)
    assert outcome.passed, outcome
    return outcome


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read from the files per checkpoint tensor (FileSlice reads exactly the bytes it returns)."""
    reads: dict[str, int] = defaultdict(int)
    original = file_slices.FileSlice.__getitem__

    def counted(self: file_slices.FileSlice, index: Any) -> torch.Tensor:
        out = original(self, index)
        reads[self.name] += out.numel() * out.element_size()
        return out

    monkeypatch.setattr(file_slices.FileSlice, "__getitem__", counted)
    return reads


def simulated_from_disk(directory: Path, tp: int, ep: bool, reads: dict[str, int],
                        seed: int = 0) -> list[dict[str, int]]:
    """Every rank rewritten with the shipped rules, loading its slices from `directory`; all ranks verified
    against HF eager. Returns the bytes each rank read, per checkpoint tensor."""
    source = resolve(str(directory), progress=False)
    config = source.config
    group = SimulatedGroup(tp, timeout=120)
    models, per_rank = [], []
    for rank in range(tp):
        captured = capture(config)
        context, _ = rewrite(captured, list(shipped_rule_paths(config.model_type)), ParallelLayout(tp=tp, ep=ep, rank=rank))
        retarget_devices(captured.graph_module, CPU)
        reads.clear()

        def from_disk(specs: dict, tied: dict, device: torch.device, dtype: torch.dtype, slicer=None) -> dict:
            return load_weights(directory, specs, tied, device, dtype, slicer=slicer, config=config)

        # the compiler's own load step: slices per rank, fused projections from their sources, tied weights
        tensors = load_graph_weights(captured, context, from_disk, captured.parameter_specs(), CPU, torch.float32)
        per_rank.append(dict(reads))
        install_weights(captured.graph_module, tensors)
        model = CompiledModel(captured.graph_module, context.state.get(KV_CACHES, []), config, CPU, torch.float32,
                              backend=None, tp=tp)
        model._fn = group.forward(rank, captured.graph_module)
        models.append(model)
    hf = reference(directory)
    results = group.run(lambda rank: verify(models[rank], hf if rank == 0 else None, seed=seed, atol=ATOL))
    assert results[0].passed, results[0]
    return per_rank


def skip_without_plans(model_type: str) -> None:
    """transformers 5.17's granitemoe config has neither a tp nor an ep plan: nothing says how to split it."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    if not getattr(config, "base_model_tp_plan", None) and not getattr(config, "base_model_ep_plan", None):
        pytest.skip(f"transformers {transformers.__version__}'s {model_type} config has no tp or ep plan")


def expert_tensors(sizes: dict[str, int]) -> dict[str, int]:
    """The routed experts' tensors on disk (per-expert or already 3-D), not shared experts or routers."""
    return {name: size for name, size in sizes.items()
            if (".experts." in name or "input_linear" in name or "output_linear" in name)
            and "shared_expert" not in name}


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_saved_by_transformers_compiles_and_verifies(tmp_path: Path, model_type: str) -> None:
    directory = saved(tmp_path, model_type, seed=3)
    model = tiny_model(tiny_config(model_type, **SIZES), 3)
    on_disk, runtime = set(disk_names(directory)), set(model.state_dict())
    assert (on_disk != runtime) is (model_type in CONVERTED), sorted(on_disk ^ runtime)[:4]
    compile_and_verify(directory, seed=3)


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_dense_types_saved_by_transformers_verify(tmp_path: Path, model_type: str) -> None:
    compile_and_verify(saved(tmp_path, model_type, seed=8), seed=8)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_width_split_ranks_read_half_of_every_expert(tmp_path: Path, model_type: str,
                                                     count_reads: dict[str, int]) -> None:
    skip_without_plans(model_type)
    directory = saved(tmp_path, model_type, seed=1)
    if model_type == "gpt_oss":  # its config has an ep_plan only: give its experts a tp plan (as test_moe_parallel)
        config = json.loads((directory / "config.json").read_text())
        config["base_model_tp_plan"] = {"layers.*.mlp.experts": "moe_tp_experts"}
        (directory / "config.json").write_text(json.dumps(config))
    per_rank = simulated_from_disk(directory, tp=2, ep=False, reads=count_reads, seed=1)
    experts = expert_tensors(disk_names(directory))
    assert experts
    for name, size in sorted(experts.items()):
        if name.endswith("down_proj_bias") and [reads.get(name, 0) for reads in per_rank] == [size, size]:
            continue  # gpt_oss' output bias is added after the all-reduce on one rank: it is read whole
        assert [reads.get(name, 0) for reads in per_rank] == [size // 2, size // 2], name


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_expert_parallel_ranks_open_only_their_experts(tmp_path: Path, model_type: str,
                                                       count_reads: dict[str, int]) -> None:
    skip_without_plans(model_type)
    directory = saved(tmp_path, model_type, seed=2)
    per_rank = simulated_from_disk(directory, tp=2, ep=True, reads=count_reads, seed=2)
    experts = expert_tensors(disk_names(directory))
    total = sum(experts.values())
    for rank, reads in enumerate(per_rank):
        assert sum(reads.get(name, 0) for name in experts) == total // 2, rank
        start, stop = split_range(4, 2, rank)
        for name, size in experts.items():
            index = _expert_index(name)
            if index is not None:  # a per-expert tensor: opened by its rank alone, and read whole
                assert reads.get(name, 0) == (size if start <= index < stop else 0), (rank, name)


def _expert_index(name: str) -> int | None:
    parts = name.split(".")
    for before, part in zip(parts, parts[1:]):
        if before == "experts" and part.isdigit():
            return int(part)
    return None


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_sharded_checkpoint_with_index(tmp_path: Path, model_type: str, count_reads: dict[str, int]) -> None:
    directory = saved(tmp_path, model_type, seed=4, max_shard_size="60KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    compile_and_verify(directory, seed=4)
    if model_type == "qwen3_moe":
        per_rank = simulated_from_disk(directory, tp=2, ep=True, reads=count_reads, seed=4)
        experts = expert_tensors(disk_names(directory))
        assert [sum(reads.get(name, 0) for name in experts) for reads in per_rank] == [sum(experts.values()) // 2] * 2


def test_tied_embeddings_have_no_lm_head_on_disk(tmp_path: Path) -> None:
    model = tiny_model(tiny_config("qwen3", tie_word_embeddings=True), 5)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in disk_names(tmp_path)
    compile_and_verify(tmp_path, seed=5)


def test_extra_tensors_are_named_in_one_warning_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    saved(tmp_path, "qwen3_moe", seed=6)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    generator = torch.Generator().manual_seed(0)
    extras = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8, generator=generator),
              "model.layers.2.mlp.experts.0.gate_proj.weight": torch.randn(32, 64, generator=generator),  # MTP layer
              "model.layers.2.eh_proj.weight": torch.randn(64, 128, generator=generator)}
    save_file({**tensors, **extras}, str(path), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="hfrewrite.compiler.weights"):
        compile_and_verify(tmp_path, seed=6)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(name in warnings[0] for name in extras), warnings


def test_bf16_checkpoint_runs_in_fp32(tmp_path: Path) -> None:
    saved(tmp_path, "mixtral", seed=7, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    compile_and_verify(tmp_path, seed=7)


def _rewrite_checkpoint(directory: Path, change: dict[str, torch.Tensor | None]) -> None:
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})


def _load(directory: Path) -> dict[str, torch.Tensor]:
    source = resolve(str(directory), progress=False)
    captured = capture(source.config)
    return load_weights(directory, captured.parameter_specs(), captured.tied_weights, CPU, config=source.config)


def test_missing_weights_name_the_weight_and_the_checkpoint(tmp_path: Path) -> None:
    saved(tmp_path, "qwen3_moe")
    down = [f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(4)]
    _rewrite_checkpoint(tmp_path, {name: None for name in down})
    with pytest.raises(WeightError, match=r"model\.layers\.1\.mlp\.experts\.down_proj is not in the checkpoint "
                                          + str(tmp_path)):
        _load(tmp_path)
    saved(tmp_path, "qwen3_moe")
    _rewrite_checkpoint(tmp_path, {"model.layers.0.mlp.experts.3.up_proj.weight": None})
    gate_up = r" for weight model\.layers\.0\.mlp\.experts\.gate_up_proj"
    with pytest.raises(WeightError, match=r"experts\.0\.gate_proj\.weight and 6 more of the checkpoint "
                                          + str(tmp_path) + gate_up):
        _load(tmp_path)


def test_misshaped_weights_name_the_weight_and_the_checkpoint(tmp_path: Path) -> None:
    saved(tmp_path, "mixtral")
    wide = {f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": torch.randn(64, 40) for e in range(4)}
    _rewrite_checkpoint(tmp_path, wide)
    with pytest.raises(WeightError, match=r"weight model\.layers\.0\.mlp\.experts\.down_proj in " + str(tmp_path)
                                          + r" \(converted .* from model\.layers\.0\.block_sparse_moe\.experts\.0\.w2"
                                            r"\.weight and 3 more\) has shape \(4, 64, 40\), expected \(4, 64, 128\)"):
        _load(tmp_path)
    saved(tmp_path, "mixtral")
    _rewrite_checkpoint(tmp_path, {"model.norm.weight": torch.randn(63)})
    with pytest.raises(WeightError, match=r"weight model\.norm\.weight in .*model\.safetensors has shape \(63,\)"):
        _load(tmp_path)


def test_quantized_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    saved(tmp_path, "qwen3_moe")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightError, match="quantized .fp8"):
        load_weights(tmp_path, {}, {}, CPU)
