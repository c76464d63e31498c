"""Whether a config is a causal (decoder-only) LM, read from the model transformers builds for it.

Its own module (not sources): verification asks it, and sources sits below the tiny-model builder, which
picks a model kind, whose verifier is verification; one direction of imports only.
"""
from __future__ import annotations

import copy

from transformers import PretrainedConfig

from hfrewrite.errors import ModelSourceError


def causal_lm_problem(config: PretrainedConfig) -> str | None:
    """Why `config` is not a causal (decoder-only) LM, or None; read from the model itself, not its type name.

    An encoder-decoder config says so; an encoder (BERT-like) builds attention modules whose `is_causal`
    flag is False (transformers reads it from config.is_decoder), which paged causal attention would
    silently change.
    """
    import accelerate
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # BERT's "add is_decoder=True" advice: the answer below says it better
    try:
        with accelerate.init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except ValueError as error:
        return f"transformers has no causal LM for it ({str(error).splitlines()[0]})"
    finally:
        hf_logging.set_verbosity(verbosity)
    bidirectional = sorted(name for name, module in model.named_modules() if getattr(module, "is_causal", None) is False)
    if bidirectional:
        more = f" and {len(bidirectional) - 1} more" if len(bidirectional) > 1 else ""
        return (f"its attention is not causal ({bidirectional[0]}{more} attend in both directions; "
                f"config.is_decoder={getattr(config, 'is_decoder', None)})")
    return None


def require_causal_lm(config: PretrainedConfig, name: str) -> None:
    """Refuse a model that is not a causal LM, before anything is captured or compiled."""
    problem = causal_lm_problem(config)
    if problem is not None:
        raise ModelSourceError(f"{name} ({config.model_type}) cannot be compiled as a causal language model: "
                               f"{problem}. Encoders and encoder-decoders are not causal LMs: hfrewrite's paged "
                               f"attention would make them causal and compute a different function")
