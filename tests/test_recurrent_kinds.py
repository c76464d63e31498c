"""State-space / recurrent models are refused by the kind check with one clear error, before capture."""
from __future__ import annotations

import pytest
from transformers import AutoConfig

from hfrewrite.compiler.kinds import kind_for
from hfrewrite.errors import UnsupportedKindError


@pytest.mark.parametrize("model_type", ["mamba", "mamba2", "rwkv", "xlstm", "jamba"])
def test_recurrent_models_are_refused_by_kind(model_type: str) -> None:
    with pytest.raises(UnsupportedKindError, match="state-space / recurrent layers, which hfrewrite does not"):
        kind_for(AutoConfig.for_model(model_type))


@pytest.mark.parametrize("model_type", ["gpt_neo", "llama"])
def test_attention_models_are_not_refused(model_type: str) -> None:
    assert kind_for(AutoConfig.for_model(model_type)).name == "causal-lm"
