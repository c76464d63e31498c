"""Property-based equivalence: rewritten, compiled, paged models equal HF eager (fp32, 1e-4 abs on logits).

Hypothesis draws tiny configs (layers, widths, heads, KV heads, head dim, vocab, sliding window,
softcaps where the type has them) and the verify step draws sequences of mixed lengths split into
prefill chunks and decode steps, packed together. The many-example property runs the rewritten graph
under dynamo with the eager backend; one example per type runs through inductor (the real compile).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfrewrite.compiler.tiny import tiny_config

from .equivalence import check_equivalent

MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "gpt2", "gptj", "codegen"]
SOFTCAP_TYPES = {"gemma2"}
MLA_TYPES = ["youtu", "axk1"]  # DeepSeek-V3-style MLA beside deepseek_v3 (rules/moe/test_moe.py), one example each


@st.composite
def tiny_sizes(draw: st.DrawFn, model_type: str) -> dict:
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16]))
    sizes = {
        "num_hidden_layers": draw(st.integers(2, 3)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": heads * head_dim,
        "intermediate_size": draw(st.sampled_from([32, 64])),
        "vocab_size": draw(st.sampled_from([97, 128, 256])),
        "sliding_window": draw(st.sampled_from([3, 5, 64])),
    }
    if model_type == "gpt2":
        sizes["num_key_value_heads"] = heads  # GPT-2 has no GQA
    if model_type in SOFTCAP_TYPES:
        sizes["attn_logit_softcapping"] = draw(st.sampled_from([None, 2.0, 20.0]))
        sizes["final_logit_softcapping"] = draw(st.sampled_from([None, 3.0, 30.0]))
    return sizes


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)
@given(data=st.data())
def test_rewritten_model_equals_hf_eager(model_type: str, data: st.DataObject) -> None:
    sizes = data.draw(tiny_sizes(model_type), label="sizes")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    check_equivalent(tiny_config(model_type, **sizes), seed, backend="eager")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_inductor_compiled_model_equals_hf_eager(model_type: str, data: st.DataObject) -> None:
    sizes = data.draw(tiny_sizes(model_type), label="sizes")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    check_equivalent(tiny_config(model_type, **sizes), seed, backend="inductor")


@pytest.mark.parametrize("model_type", MLA_TYPES)
def test_mla_model_equals_hf_eager(model_type: str) -> None:
    check_equivalent(tiny_config(model_type), seed=5, backend=None)
