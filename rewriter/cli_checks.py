"""Everything the CLI can check before capture, so bad input costs a second, not a compile.

Option values (sampling, sizes, --backend, --save), then what needs only the model's config
(causal LM, --tp against the attention heads) and its tokenizer (prompts against the context).
Under `--tp` the launcher checks once before spawning ranks.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from hfrewrite.errors import OptionError, RequestError

RUNS_MODEL = ("compile", "explain", "generate", "bench")


def batch_sizes(text: str) -> list[int]:
    """bench --batch-sizes as integers: positive, comma-separated, like 1,16."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise OptionError(f"--batch-sizes expects positive integers like 1,16, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise OptionError(f"--batch-sizes: every batch size must be at least 1, got {text}")
    return sizes


def check_options(args: argparse.Namespace) -> None:
    """The option values alone: sampling, sizes, --backend, --save (no model needed)."""
    from hfrewrite.compiler import trust

    trust.allow_remote_code(bool(getattr(args, "trust_remote_code", False)))
    backend = getattr(args, "backend", None)
    if backend is not None and backend != "none":
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=None)
        if backend not in known:
            raise OptionError(f"--backend {backend!r} is not a torch.compile backend; use 'none' (run the graph "
                              f"eagerly) or one of: {', '.join(sorted(torch._dynamo.list_backends()))}")
    if getattr(args, "save", None) is not None:
        from hfrewrite.compiler.report import check_save_target

        check_save_target(args.save)
    if args.command == "generate":
        _check_sampling(args)
    if args.command == "bench":
        batch_sizes(args.batch_sizes)
        for flag in ("prompt_len", "new_tokens"):
            if getattr(args, flag) < 1:
                raise OptionError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")


def _check_sampling(args: argparse.Namespace) -> None:
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise OptionError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise OptionError(f"--top-k must be >= 0 (0 = no top-k cut), got {args.top_k}")
    if not (0.0 <= args.top_p <= 1.0):  # NaN fails this too
        raise OptionError(f"--top-p must be between 0 and 1, got {args.top_p}")
    for flag in ("max_new_tokens", "block_size", "num_blocks"):
        if getattr(args, flag) < 1:
            raise OptionError(f"--{flag.replace('_', '-')} ({flag}) must be at least 1, got {getattr(args, flag)}")
    for index, prompt in enumerate(args.prompt):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise RequestError(f"--prompt #{index + 1} is not UTF-8 text (an undecodable byte at character "
                               f"{error.start}); give prompts as UTF-8") from None


def check_model(args: argparse.Namespace) -> None:
    """What needs the model's config: a causal LM, --tp against its heads, prompts against its context."""
    if args.command not in RUNS_MODEL:
        return
    from hfrewrite.compiler.kinds import kind_for
    from hfrewrite.compiler.sources import require_causal_lm, resolve

    source = resolve(args.model, progress=not args.quiet)
    kind = kind_for(source.config, source.directory)  # an unsupported kind is refused here, before capture
    if kind.name == "causal-lm":  # other kinds have their own checks; a causal LM must be causal
        require_causal_lm(source.config, args.model)
    elif kind.head == "pool" and args.command in ("generate", "bench"):   # embedding models make no text
        from hfrewrite.errors import UnsupportedKindError

        raise UnsupportedKindError(f"{args.model} is an {kind.name} model: it makes vectors, not text; `{args.command}` "
                                   f"needs a causal LM (embed it with `hfrewrite embed {args.model} --text ...`)")
    if args.tp > 1:
        _check_heads(source.config, args.tp)
    if args.command == "generate":
        _check_prompts(args, source)
        if getattr(args, "image", None):  # unreadable images and a text-only model are refused before compiling
            from hfrewrite.cli_vision import ImageInputError, open_image, pair_images

            if kind.name != "vision-language":
                raise ImageInputError(f"--image given, but {args.model!r} is a {kind.name} model, not vision-language")
            pair_images(list(args.prompt), list(args.image))
            for path in args.image:
                open_image(path)


def _check_heads(config: Any, tp: int) -> None:
    from hfrewrite.parallel.sharding import head_layout

    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    if not isinstance(heads, int):
        return
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    try:
        for rank in range(tp):
            head_layout(heads, kv_heads, tp, rank)
    except ValueError as error:
        raise OptionError(f"--tp {tp} does not fit {text.model_type}'s attention: {error}") from None


def _check_prompts(args: argparse.Namespace, source: Any) -> None:
    """Refuse before compiling when no prompt can be served (one that can is served, the others refused)."""
    from hfrewrite.compiler.sources import load_tokenizer
    from hfrewrite.runtime.generation import ByteTokenizer, encode_prompt

    config = source.config.get_text_config()
    context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))
    tokenizer = load_tokenizer(source) or ByteTokenizer(int(config.vocab_size))
    reasons = []
    for index, prompt in enumerate(args.prompt):
        count = len(encode_prompt(tokenizer, prompt, chat=not args.no_chat_template))
        needed = count + args.max_new_tokens
        if count == 0:
            reasons.append(f"request {index} refused: the prompt is empty")
        elif needed > context:
            reasons.append(f"request {index} refused: prompt of {count} tokens plus max_new_tokens="
                           f"{args.max_new_tokens} is over the model's context of {context}")
        elif -(-needed // args.block_size) > args.num_blocks:
            reasons.append(f"request {index} refused: prompt plus max_new_tokens needs {-(-needed // args.block_size)}"
                           f" KV blocks of {args.block_size} tokens; the cache has only {args.num_blocks} (raise "
                           f"--num-blocks or lower --max-new-tokens)")
    if len(reasons) == len(args.prompt):
        raise RequestError("; ".join(reasons) + " (nothing was compiled)")
