"""`hfrewrite serve`: compile (and verify) a model, then serve it over HTTP with uvicorn until SIGTERM.

Under --tp every rank compiles its shard and builds the same Engine; rank 0 serves HTTP and drives,
broadcasting each step's submitted and aborted requests, and the other ranks follow (serve.loop);
the launcher hands a SIGTERM to rank 0, which stops the others once it has drained. An embedding
model gets an EmbeddingLoop instead of an Engine (serve.embed_loop), followed by the other ranks alike.
SIGTERM (or Ctrl-C) makes uvicorn stop accepting connections and wait for the streams in flight; the
engine loop then finishes what is left and the command exits 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from hfrewrite.runtime.engine import Engine
from hfrewrite.runtime.generation import ByteTokenizer, eos_ids, make_decode
from hfrewrite.runtime.kv_cache import CacheConfig

if TYPE_CHECKING:
    from hfrewrite.compiler.build import CompileOptions, CompileResult


def build_engine(result: CompileResult, tokenizer: Any, lock: threading.Lock, cache_config: CacheConfig,
                 max_running: int) -> Engine:
    """The server's Engine: the decode goes through `lock` (the handlers tokenize on another thread)."""
    model = result.model
    decode = make_decode(tokenizer)

    def locked_decode(ids: list[int]) -> str:
        with lock:
            return decode(ids)

    micro_batches = 1
    if getattr(model, "vision", None) is not None:  # a VLM: the Engine over its embeddings runner (eager)
        from hfrewrite.runtime.multimodal import vision_engine, vision_eos_ids

        return vision_engine(model, cache_config, vision_eos_ids(model, tokenizer), locked_decode,
                             max_running=max_running, isolate_errors=True)
    if hasattr(model, "split"):  # stage 0 of a pipeline: one micro-batch per stage in flight
        forward = model
        micro_batches = len(model.split.stages)
    else:  # the model's own cache and runner for this config (CUDA graphs captured once, on accelerators)
        _, forward = model.serving(cache_config)
    return Engine(forward, cache_config, model.device, model.max_context, eos_ids(model, tokenizer), locked_decode,
                  micro_batches=micro_batches, max_running=max_running, isolate_errors=True)


def serve(args: argparse.Namespace, options: CompileOptions, result: CompileResult | None = None) -> int:
    """Compile, verify unless --no-verify (exit 1 when it fails), then serve until stopped."""
    import uvicorn

    from hfrewrite.compiler.build import compile_model
    from hfrewrite.compiler.sources import load_tokenizer
    from hfrewrite.parallel import distributed
    from hfrewrite.compiler.kinds import kind_for
    from hfrewrite.compiler.embedder import embedder_for
    from hfrewrite.serve.app import ServerState, create_app
    from hfrewrite.serve.embed_loop import EmbeddingLoop
    from hfrewrite.serve.embed_loop import follow as follow_embeddings
    from hfrewrite.serve.loop import EngineLoop, follow
    from hfrewrite.serve.metrics import ServerMetrics

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if result is None:
        result = compile_model(args.model, options)
    if result.verification is not None and not result.verification.passed:
        print(f"hfrewrite serve: {args.model} does not verify against HF eager; not serving it "
              f"(run `hfrewrite compile {args.model}` for the report, or pass --no-verify)", file=sys.stderr)
        return 1
    vocab = int(result.model.config.get_text_config().vocab_size)
    processor = None
    if getattr(result.model, "vision", None) is not None:  # chat messages may hold images: the model's processor
        from hfrewrite.compiler.vision import load_processor

        processor = load_processor(result.source.directory, result.source.config)
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(result.source)
    tokenizer = tokenizer or ByteTokenizer(vocab)
    lock = threading.Lock()
    cache_config = CacheConfig(args.block_size, args.num_blocks)
    world = args.tp if not hasattr(result.model, "split") else 1
    sync = distributed.broadcast if world > 1 else None
    follower = world > 1 and distributed.rank() != 0
    if follower:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # rank 0 drains, then tells this rank to stop
    metrics = ServerMetrics(cache_config.num_blocks)
    kind = kind_for(result.source.config, result.source.directory)
    loop: EngineLoop | EmbeddingLoop
    if kind.head == "pool":  # an embedding model: /v1/embeddings, packed prefill-only forwards
        embedder, tokenize = embedder_for(result.source, result.model)
        if follower:
            follow_embeddings(embedder, sync)
            return 0
        loop = EmbeddingLoop(embedder, tokenize, "token_type_ids" in kind.inputs, metrics, args.max_queue, sync)
    else:
        engine = build_engine(result, tokenizer, lock, cache_config, args.max_running)
        if follower:
            follow(engine, sync)
            return 0
        loop = EngineLoop(engine, metrics, args.max_queue, sync)
    state = ServerState(loop, metrics, tokenizer, lock, args.served_model_name or args.model, vocab, args.api_key,
                        processor)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=None)
    logging.getLogger("hfrewrite.serve").info("serving %s (%s) on http://%s:%d/v1 (%d KV blocks of %d tokens)",
                                              state.model_name, kind.name, args.host, args.port,
                                              cache_config.num_blocks, cache_config.block_size)
    _server_type()(config).run()
    return 0


def _server_type() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM is how a server is stopped: after the drain the command exits 0, where uvicorn would
        re-raise the signal and die by it (Ctrl-C still ends as an interrupt)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)

    return DrainingServer
