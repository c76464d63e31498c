"""`hfrewrite` command line: compile, explain, generate, embed, bench, serve, rules suggest.

User errors (HfRewriteError) print as one paragraph and exit 2; a failed verification exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from hfrewrite import cli_checks
from hfrewrite.errors import HfRewriteError

if TYPE_CHECKING:
    from hfrewrite.compiler.options import CompileResult


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="smollm2-135m, tiny:<model_type>, a local directory with config.json and "
                                      "*.safetensors, or a hub id present in the local hub cache")
    parser.add_argument("--rules", action="append", default=[], type=Path, metavar="PATH",
                        help="extra YAML rule file or directory (repeatable); applied after the shipped rules")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--device", default=None, help="torch device (default: the accelerator if any, else cpu)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend, or 'none' to run the graph eagerly")
    parser.add_argument("--compile-granularity", choices=("auto", "graph", "layer"), default="auto",
                        help="graph: torch.compile the whole graph (its compile time grows with depth); layer: cut "
                             "per decoder layer and compile one graph per group of identical layers, weights as "
                             "inputs; auto (default): layer on accelerators, graph on the CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    parser.add_argument("--tp", type=_positive_int, default=1, metavar="N",
                        help="tensor parallelism over N ranks: spawns N local processes (gloo on the CPU, NCCL with "
                             "one GPU each), or uses the ranks torchrun started")
    parser.add_argument("--ep", action="store_true",
                        help="expert parallelism: split whole MoE experts over the --tp ranks (each rank loads and "
                             "runs only its experts) instead of splitting every expert's width")
    parser.add_argument("--pp", type=_positive_int, default=1, metavar="N",
                        help="pipeline parallelism: cut the model into N stages by its pp_plan, one rank each (x --tp)")
    parser.add_argument("--pp-layers", type=_layer_counts, default=(), metavar="A,B,...",
                        help="decoder layers per pipeline stage, e.g. 10,14 (default: near-even split)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="run decode steps uncaptured (default on accelerators: replay CUDA graphs per batch "
                             "bucket)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow Python files of the model directory (auto_map) to run; off by default")


def _layer_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected layer counts like 10,14, got {text!r}") from error
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"every pipeline stage needs at least one layer, got {text}")
    return counts


def _pp_stages(args: argparse.Namespace) -> int:
    """Pipeline stages asked for (--pp, or the length of --pp-layers); 1 for commands without them."""
    from hfrewrite.parallel.pp.split import stage_count

    return stage_count(getattr(args, "pp", 1), getattr(args, "pp_layers", ()))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


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
    generate_cmd.add_argument("--image", action="append", default=[],
                              help="a local image file for a vision-language model (repeatable)")
    generate_cmd.add_argument("--video", action="append", default=[],
                              help="a video as its frames: a directory of frame images or a comma-separated list "
                                   "of them (Qwen2-VL; repeatable)")
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
    bench_cmd.add_argument("--batch-sizes", default="1,16", metavar="A,B,...")
    bench_cmd.add_argument("--prompt-len", type=int, default=64)
    bench_cmd.add_argument("--new-tokens", type=int, default=64)
    bench_cmd.add_argument("--baselines", default=None, metavar="LIST",
                           help="transformers generate modes to compare with: eager,static (default: both on an "
                                "accelerator, eager on the CPU; empty for none)")
    bench_cmd.add_argument("--json", action="store_true")

    embed_cmd = commands.add_parser("embed", help="embed texts through a compiled embedding model")
    _add_model_args(embed_cmd)
    embed_cmd.add_argument("--text", action="append", required=True, help="text to embed (repeatable: a batch)")
    embed_cmd.add_argument("--json", action="store_true", help="print OpenAI's embeddings response shape")

    serve_cmd = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(serve_cmd)
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--max-running", type=_positive_int, default=64, metavar="N",
                           help="sequences batched at once")
    serve_cmd.add_argument("--max-queue", type=_positive_int, default=256, metavar="N",
                           help="sequences waiting beyond that before new requests get 503")
    serve_cmd.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve_cmd.add_argument("--no-verify", action="store_true", help="skip the comparison with HF eager")
    serve_cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve_cmd.add_argument("--served-model-name", default=None, metavar="NAME", help="the model name clients send")
    serve_cmd.add_argument("--block-size", type=_positive_int, default=16)
    serve_cmd.add_argument("--num-blocks", type=_positive_int, default=512)

    rules_cmd = commands.add_parser("rules", help="rule-file tools")
    rules_actions = rules_cmd.add_subparsers(dest="rules_command", required=True)
    suggest_cmd = rules_actions.add_parser("suggest", help="print a proposed YAML tensor-parallel rule file for a "
                                                           "model without a tp_plan, from its graph's dataflow")
    suggest_cmd.add_argument("model", help="as for compile")
    suggest_cmd.add_argument("--rules", action="append", default=[], type=Path, metavar="PATH",
                             help="rule files whose TP rules already cover some sites (left out of the proposal)")
    suggest_cmd.add_argument("--tp", type=_positive_int, default=2, metavar="N",
                             help="the tp the proposal is checked against (default 2)")
    suggest_cmd.add_argument("--trust-remote-code", action="store_true",
                             help="allow Python files of the model directory (auto_map) to run; off by default")
    suggest_cmd.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return parser


def _options(args: argparse.Namespace, verify: bool):
    from hfrewrite.compiler.options import CompileOptions
    from hfrewrite.parallel import distributed

    if getattr(args, "ep", False) and _pp_stages(args) > 1:
        raise HfRewriteError("--ep with --pp is not supported yet: the pipeline stages split experts by width (the "
                             "--tp default)")
    return CompileOptions(rules=args.rules, dtype=args.dtype, device=args.device, verify=verify,
                          backend=None if args.backend == "none" else args.backend,
                          progress=not args.quiet and distributed.env_rank()[0] == 0, tp=args.tp, ep=getattr(args, "ep", False),
                          pp=_pp_stages(args), pp_layers=tuple(args.pp_layers),
                          device_graphs=not getattr(args, "no_cuda_graphs", False),
                          granularity=args.compile_granularity)


def cmd_compile(args: argparse.Namespace, result: CompileResult | None = None) -> int:
    """Compile (or take the `result` a pipeline's stage 0 built), print the report, exit 1 if it does not verify."""
    from hfrewrite.compiler.build import compile_model
    from hfrewrite.compiler.report import compile_report, format_compile_report, save_artifact

    if result is None:
        result = compile_model(args.model, _options(args, verify=not args.no_verify))
    report = compile_report(result)
    print(json.dumps(report, indent=None if args.json else 2) if args.json else format_compile_report(report))
    if args.save:  # after the report, so a failed save does not lose it
        save_artifact(result, report, args.save)
    verification = result.verification
    return 1 if verification is not None and not verification.passed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from hfrewrite.compiler.build import explain_model

    print(explain_model(args.model, _options(args, verify=False)))
    return 0


def cmd_generate(args: argparse.Namespace, result: CompileResult | None = None) -> int:
    """Stream the prompts' continuations, through the compiled model (or a pipeline's stage 0: `result`)."""
    from hfrewrite.runtime.generation import ByteTokenizer, Generator, encode_prompt
    from hfrewrite.compiler.build import compile_model
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams
    from hfrewrite.compiler.sources import load_tokenizer

    if result is None:
        result = compile_model(args.model, _options(args, verify=False))
    media = getattr(args, "image", None) or getattr(args, "video", None)
    if getattr(result.model, "vision", None) is not None or media:
        from hfrewrite.cli_vision import cmd_generate_vision, ImageInputError

        if getattr(result.model, "vision", None) is None:
            raise ImageInputError(f"--image or --video given, but {args.model!r} is not a vision-language model")
        return cmd_generate_vision(args, result)
    generator_type = Generator
    if _pp_stages(args) > 1:  # stage 0 of a pipeline: one micro-batch per stage in flight
        from hfrewrite.parallel.pp.command import PipelinedGenerator

        generator_type = PipelinedGenerator
    tokenizer = load_tokenizer(result.source) or ByteTokenizer(int(result.model.config.vocab_size))
    prompts = [encode_prompt(tokenizer, p, chat=not args.no_chat_template) for p in args.prompt]
    if args.tp > 1 and args.seed is None:
        from hfrewrite.parallel import distributed

        args.seed = distributed.shared_seed()  # every rank must sample the same tokens
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    generator = generator_type(result.model, tokenizer, CacheConfig(args.block_size, args.num_blocks))
    from hfrewrite.cli_stream import print_events

    return print_events(generator.stream(prompts, params), args.prompt)


def cmd_bench(args: argparse.Namespace) -> int:
    from hfrewrite.runtime.benchmark import format_table, run_benchmark

    baselines = None if args.baselines is None else tuple(b for b in args.baselines.split(",") if b)
    report = run_benchmark(args.model, _options(args, verify=False), cli_checks.batch_sizes(args.batch_sizes),
                           args.prompt_len, args.new_tokens, baselines)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed the texts; print one line per text, or OpenAI's embeddings response with --json."""
    from hfrewrite.compiler.build import compile_model
    from hfrewrite.compiler.embedder import embedder_for
    from hfrewrite.runtime.embedding import format_embeddings, openai_response

    if _pp_stages(args) > 1:
        raise HfRewriteError("embed runs on one device or under --tp (no --pp for embedding models yet)")
    result = compile_model(args.model, _options(args, verify=False))
    embedder, tokenize = embedder_for(result.source, result.model)
    ids, types = tokenize(args.text)
    vectors = embedder.embed(ids, types)
    tokens = sum(len(row) for row in ids)
    print(json.dumps(openai_response(vectors, args.model, tokens)) if args.json else format_embeddings(vectors))
    return 0


def cmd_serve(args: argparse.Namespace, result: CompileResult | None = None) -> int:
    from hfrewrite.serve.server import serve

    return serve(args, _options(args, verify=not args.no_verify), result)


def cmd_rules(args: argparse.Namespace) -> int:
    from hfrewrite.compiler.sources import resolve
    from hfrewrite.compiler.suggest import suggest_rules

    source = resolve(args.model, progress=not args.quiet)
    print(suggest_rules(source.config, args.model, tp=args.tp, extra=args.rules), end="")
    return 0


COMMANDS = {"compile": cmd_compile, "explain": cmd_explain, "generate": cmd_generate, "bench": cmd_bench,
            "rules": cmd_rules, "embed": cmd_embed, "serve": cmd_serve}
SPAWNING = ("compile", "generate", "bench", "embed", "serve")  # commands that run the model, on every rank under --tp


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the command on tp x pp spawned local ranks; print the failing rank's error once.

    A pipeline split that the config already rules out fails here, before starting ranks that would all fail.
    """
    from hfrewrite.parallel import distributed

    if _pp_stages(args) > 1:
        from hfrewrite.parallel.pp.command import check_stage_counts

        check_stage_counts(args.model, _pp_stages(args), tuple(args.pp_layers), progress=not args.quiet)
    # a server drains on SIGTERM: rank 0 gets it, finishes its requests, then ends the other ranks
    result = distributed.launch(args.tp * _pp_stages(args), main, (argv,),
                                drain_rank=0 if args.command == "serve" else None)
    if result.message:
        print(result.message.rstrip(), file=sys.stderr)
    return result.code


def main(argv: Sequence[str] | None = None) -> int:
    from hfrewrite.parallel import distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    spawning = args.command in SPAWNING
    try:
        cli_checks.check_options(args)
        if not distributed.spawned():  # a spawned rank's launcher has checked the model already
            cli_checks.check_model(args)
        if spawning and args.tp * _pp_stages(args) > 1 and not distributed.launched():
            return _launch(args, argv)
        with distributed.rank_zero_output():
            if spawning and _pp_stages(args) > 1:  # stage 0 runs the command, the other stages serve
                from hfrewrite.parallel.pp.command import bench_stages, run_stage

                command = bench_stages if args.command == "bench" else COMMANDS[args.command]
                code = run_stage(args, _options(args, verify=args.command == "compile" and not args.no_verify),
                                 command)
            else:
                code = COMMANDS[args.command](args)
        distributed.finish()
        return code
    except HfRewriteError as error:
        message = textwrap.fill(str(error), width=100, break_long_words=False, break_on_hyphens=False)
        rank, world, _ = distributed.env_rank()
        where = f" (rank {rank} of {world})" if world > 1 else ""
        text = f"hfrewrite {args.command}: error{where}: {type(error).__name__}\n{message}"
        if not distributed.report_error(text):
            print(text, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not distributed.spawned():  # the launcher says it once for all its ranks
            print("hfrewrite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
