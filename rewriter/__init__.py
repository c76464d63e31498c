"""hfrewrite: compile Hugging Face transformers models through FX graph rewriting, verified against HF eager."""
__version__ = "0.1.0"
