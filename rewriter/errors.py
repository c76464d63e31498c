"""One error family for everything a user can get wrong.

The CLI catches `HfRewriteError` (and only it) and prints its message as one paragraph, so every
message must say what is wrong and where: the file and line, the rule, the module or the weight.
"""
from __future__ import annotations


class HfRewriteError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""


class ModelSourceError(HfRewriteError):
    """The model id cannot be resolved to config + safetensors weights (unknown id, pickle-only, missing files)."""


class WeightError(HfRewriteError):
    """A weight is missing, mis-shaped or of an unexpected dtype."""


class RuleError(HfRewriteError):
    """A rule file is malformed, violates the schema, or names an unknown template."""


class RewriteError(HfRewriteError):
    """A rule matched but could not be applied (overlap, failed check, broken graph)."""


class CaptureError(HfRewriteError):
    """torch.export could not capture the model."""


class RequestError(HfRewriteError):
    """A generation request cannot be served (prompt over the context, KV cache too small)."""


class VerificationError(HfRewriteError):
    """The compiled model does not compute the same function as the original."""


class ArtifactError(HfRewriteError):
    """The --save artifact cannot be written where asked (a file in the way, a read-only directory)."""


class RemoteCodeError(ModelSourceError):
    """A model needs Python code from its own directory, which runs only with --trust-remote-code."""


class OptionError(HfRewriteError):
    """A command-line option has a value that cannot work (checked before any model is compiled)."""


class UnsupportedKindError(HfRewriteError):
    """The model is of a kind hfrewrite cannot capture yet (encoder-decoder, speech, ...)."""
