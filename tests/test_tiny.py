"""Tiny seeded models: every supported type builds, runs, is small, and is reproducible per seed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hfrewrite.compiler import tiny
from hfrewrite.errors import ModelSourceError
from hfrewrite.compiler.tiny import materialize_tiny, tiny_config, tiny_model

TYPES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "gpt2", "mixtral",
         "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss", "olmoe"]
MIXED = ["gemma2", "gemma3_text", "gpt_oss"]


def _ids(vocab: int, length: int = 19, seed: int = 0) -> torch.Tensor:
    """Random token ids (never all zeros)."""
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type", TYPES)
def test_builds_small_and_runs(model_type: str) -> None:
    config = tiny_config(model_type)
    assert config.num_hidden_layers == 2 and config.hidden_size == 64 and config.vocab_size == 256
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = getattr(config, name, None)
        for token in ids if isinstance(ids, list) else [ids]:
            assert token is None or 0 <= token < 256, (name, token)
    model = tiny_model(config, seed=0)
    assert sum(p.numel() for p in model.parameters()) < 400_000
    logits = _logits(model, _ids(256))
    assert logits.shape == (1, 19, 256) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("model_type", TYPES)
def test_deterministic_per_seed_and_different_across_seeds(model_type: str) -> None:
    config = tiny_config(model_type)
    ids = _ids(256, seed=1)
    first, again, other = tiny_model(config, 5), tiny_model(config, 5), tiny_model(config, 6)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert torch.equal(_logits(first, ids), _logits(again, ids))
    assert not torch.allclose(_logits(first, ids), _logits(other, ids))


def test_no_constant_checkpoint_tensors() -> None:
    """Norm weights at exactly 1 would hide a rewrite that drops them."""
    model = tiny_model(tiny_config("gemma2"), seed=0)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            assert tensor.std() > 0, name


def test_config_is_not_mutated_by_tiny_model() -> None:
    config = tiny_config("llama")
    before = config.to_dict()
    tiny_model(config, 0)
    assert config.to_dict() == before


@pytest.mark.parametrize("model_type", MIXED)
def test_mixed_layer_types_keep_both_kinds_and_a_small_window(model_type: str) -> None:
    config = tiny_config(model_type)
    assert sorted(set(config.layer_types)) == ["full_attention", "sliding_attention"]
    assert len(config.layer_types) == config.num_hidden_layers
    assert config.sliding_window == 8
    deeper = tiny_config(model_type, num_hidden_layers=5, sliding_window=3)
    assert len(deeper.layer_types) == 5 and "full_attention" in deeper.layer_types
    assert deeper.sliding_window == 3


def test_sliding_window_bites() -> None:
    """Past the window, a distant token no longer changes the output of a sliding-only model."""
    config = tiny_config("mistral", num_hidden_layers=1)
    assert config.sliding_window == 8
    model = tiny_model(config, 0)
    ids = _ids(256, length=12)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] % 255) + 1
    a, b = _logits(model, ids), _logits(model, changed)
    assert not torch.allclose(a[0, 1], b[0, 1])
    assert torch.equal(a[0, 11], b[0, 11])


def test_generic_overrides_map_onto_gpt2_names() -> None:
    config = tiny_config("gpt2", num_hidden_layers=3, num_attention_heads=2, head_dim=24, vocab_size=300,
                         num_key_value_heads=1, sliding_window=4)
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size) == (3, 2, 48, 300)
    assert getattr(config, "sliding_window", None) is None
    logits = _logits(tiny_model(config, 0), _ids(300))
    assert logits.shape == (1, 19, 300)


def test_overrides_win_and_softcapping_passes_through() -> None:
    config = tiny_config("gemma2", hidden_size=96, head_dim=8, num_attention_heads=6, num_key_value_heads=3,
                         final_logit_softcapping=5.0, attn_logit_softcapping=7.0)
    assert (config.hidden_size, config.head_dim, config.num_attention_heads) == (96, 8, 6)
    assert (config.final_logit_softcapping, config.attn_logit_softcapping) == (5.0, 7.0)
    assert config.query_pre_attn_scalar == 8
    assert torch.isfinite(_logits(tiny_model(config, 0), _ids(256))).all()


def test_moe_and_mla_fields_are_small_and_consistent() -> None:
    mixtral = tiny_config("mixtral")
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (4, 2)
    deepseek = tiny_config("deepseek_v3", num_key_value_heads=1)
    assert deepseek.n_routed_experts == 4 and deepseek.first_k_dense_replace == 1
    assert deepseek.num_key_value_heads == deepseek.num_attention_heads  # MLA has no GQA sharing
    assert deepseek.qk_head_dim == deepseek.qk_nope_head_dim + deepseek.qk_rope_head_dim
    assert tiny_config("qwen3_moe").moe_intermediate_size == 32


@pytest.mark.parametrize("model_type", ["deepseek_v3", "youtu", "axk1", "longcat_flash"])
def test_mla_head_dim_is_the_rotary_part(model_type: str) -> None:
    """MLA configs size their rotary tables by head_dim == qk_rope_head_dim; some derive it, some take the given one
    (youtu, axk1 and longcat_flash failed in HF's own forward with head_dim 16 beside an 8-wide rotary part)."""
    for overrides, rope in (({}, 8), ({"head_dim": 8}, 4)):
        config = tiny_config(model_type, **overrides)
        assert config.head_dim == config.qk_rope_head_dim == rope, (overrides, config)


@pytest.mark.parametrize("model_type", ["gptj", "codegen"])
def test_partial_rotary_fits_the_tiny_head(model_type: str) -> None:
    """rotary_dim (64 by default) is cut to half the tiny head, so the rotary stays partial and HF's forward runs."""
    for overrides, head_dim in (({}, 16), ({"head_dim": 8, "num_attention_heads": 2}, 8)):
        config = tiny_config(model_type, **overrides)
        assert config.n_embd // config.n_head == head_dim and config.rotary_dim == head_dim // 2, config
    assert tiny_config(model_type, rotary_dim=4).rotary_dim == 4
    model = tiny_model(tiny_config(model_type))
    assert torch.isfinite(_logits(model, _ids(model.config.vocab_size))).all()


def test_unknown_type_suggests_close_names() -> None:
    with pytest.raises(ModelSourceError, match="llama"):
        tiny_config("lama")


def test_non_causal_type_is_a_model_source_error() -> None:
    with pytest.raises(ModelSourceError, match="t5"):
        tiny_model(tiny_config("t5"), 0)


def test_materialize_caches_by_type_seed_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = materialize_tiny("qwen3", 1, tmp_path)
    assert first.parent == tmp_path / "tiny" and first.name.startswith("qwen3-1-")
    assert (first / "config.json").is_file() and list(first.glob("*.safetensors"))

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached tiny model")

    monkeypatch.setattr(tiny, "tiny_model", no_build)
    assert materialize_tiny("qwen3", 1, tmp_path) == first
    monkeypatch.undo()
    assert materialize_tiny("qwen3", 2, tmp_path) != first
    assert materialize_tiny("qwen3", 1, tmp_path, num_hidden_layers=3) != first
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.name.startswith(".")]


def test_materialize_writes_the_layout_transformers_writes(tmp_path: Path) -> None:
    """tiny: checkpoints are save_pretrained's (per-expert tensors on disk), not the runtime names."""
    from safetensors import safe_open

    directory = materialize_tiny("qwen3_moe", 0, tmp_path)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.mlp.experts.down_proj" not in names
