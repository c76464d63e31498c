"""`hfrewrite` command line: compile, explain, generate, bench.

User errors (HfRewriteError) print as one paragraph and exit 2; a failed verification exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from .errors import HfRewriteError


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="smollm2-135m, tiny:<model_type>, a local directory with config.json and "
                                      "*.safetensors, or a hub id present in the local hub cache")
    parser.add_argument("--rules", action="append", default=[], type=Path, metavar="PATH",
                        help="extra YAML rule file or directory (repeatable); applied after the shipped rules")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--device", default=None, help="torch device (default: the accelerator if any, else cpu)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend, or 'none' to run the graph eagerly")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfrewrite", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    compile_cmd = commands.add_parser("compile", help="capture, rewrite, compile and verify a model")
    _add_model_args(compile_cmd)
    compile_cmd.add_argument("--no-verify", action="store_true", help="skip the comparison with HF eager")
    compile_cmd.add_argument("--save", type=Path, metavar="DIR", help="write the rewritten graph and report to DIR")
    compile_cmd.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    explain_cmd = commands.add_parser("explain", help="list per rule the matched sites and the near misses")
    _add_model_args(explain_cmd)

    generate_cmd = commands.add_parser("generate", help="generate text through the compiled model (streams tokens)")
    _add_model_args(generate_cmd)
    generate_cmd.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: a batch)")
    generate_cmd.add_argument("--max-new-tokens", type=int, default=64)
    generate_cmd.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate_cmd.add_argument("--top-k", type=int, default=0)
    generate_cmd.add_argument("--top-p", type=float, default=1.0)
    generate_cmd.add_argument("--seed", type=int, default=None)
    generate_cmd.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate_cmd.add_argument("--no-chat-template", action="store_true")
    generate_cmd.add_argument("--block-size", type=int, default=16)
    generate_cmd.add_argument("--num-blocks", type=int, default=512)

    bench_cmd = commands.add_parser("bench", help="decode throughput against transformers' generate")
    _add_model_args(bench_cmd)
    bench_cmd.add_argument("--batch-sizes", default="1,16")
    bench_cmd.add_argument("--prompt-len", type=int, default=64)
    bench_cmd.add_argument("--new-tokens", type=int, default=64)
    bench_cmd.add_argument("--json", action="store_true")
    return parser


def _options(args: argparse.Namespace, verify: bool):
    from .pipeline import CompileOptions

    return CompileOptions(rules=args.rules, dtype=args.dtype, device=args.device, verify=verify,
                          backend=None if args.backend == "none" else args.backend, progress=not args.quiet)


def cmd_compile(args: argparse.Namespace) -> int:
    from .pipeline import compile_model
    from .report import compile_report, format_compile_report, save_artifact

    result = compile_model(args.model, _options(args, verify=not args.no_verify))
    report = compile_report(result)
    if args.save:
        save_artifact(result, report, args.save)
    print(json.dumps(report, indent=None if args.json else 2) if args.json else format_compile_report(report))
    verification = result.verification
    return 1 if verification is not None and not verification.passed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .pipeline import explain_model

    print(explain_model(args.model, _options(args, verify=False)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import ByteTokenizer, Generator, encode_prompt
    from .pipeline import compile_model
    from .runtime.kv_cache import CacheConfig
    from .runtime.sampling import SamplingParams
    from .sources import load_tokenizer

    result = compile_model(args.model, _options(args, verify=False))
    tokenizer = load_tokenizer(result.source) or ByteTokenizer(int(result.model.config.vocab_size))
    prompts = [encode_prompt(tokenizer, p, chat=not args.no_chat_template) for p in args.prompt]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    generator = Generator(result.model, tokenizer, CacheConfig(args.block_size, args.num_blocks))
    texts: dict[int, str] = {}
    failed = False
    single = len(prompts) == 1
    for event in generator.stream(prompts, params):
        if event.error is not None:
            print(f"error: {event.error}", file=sys.stderr)
            failed = True
            continue
        texts[event.request_id] = texts.get(event.request_id, "") + event.text
        if single:
            print(event.text, end="", flush=True)
        elif event.finished:
            print(f"[{event.request_id}] {args.prompt[event.request_id]!r}\n{texts[event.request_id]}\n", flush=True)
    if single:
        print()
    return 2 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark

    rows = run_benchmark(args.model, _options(args, verify=False),
                         [int(b) for b in args.batch_sizes.split(",")], args.prompt_len, args.new_tokens)
    print(json.dumps(rows) if args.json else "\n".join(str(r) for r in rows))
    return 0


COMMANDS = {"compile": cmd_compile, "explain": cmd_explain, "generate": cmd_generate, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HfRewriteError as error:
        message = textwrap.fill(str(error), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"hfrewrite {args.command}: error: {type(error).__name__}\n{message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hfrewrite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
