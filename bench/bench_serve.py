"""`hfrewrite serve` under N concurrent streaming clients, side by side with the offline engine on the same requests.

    python bench/bench_serve.py --model tiny:llama --backend none --clients 16 --requests 64
    python bench/bench_serve.py --model smollm2-135m --clients 8 --requests 32 [--markdown BENCHMARKS.md]

Starts the server (or uses --url), sends `--requests` completions with random prompt and output lengths
(seeded) from `--clients` concurrent `openai` clients, streaming, greedy, EOS ignored; reports requests/s,
output tokens/s, time to first token and inter-token latency p50/p99. Then runs the same requests
through the offline Generator in this process (all submitted at once) and reports the same numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "hfrewrite.cli", "serve", args.model, "--backend", args.backend, "--quiet",
               "--no-verify", "--port", str(port), "--log-level", "warning", "--max-running", str(args.clients)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL if args.quiet_server else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not come up")


def workload(args: argparse.Namespace) -> list[tuple[str, int]]:
    rng = np.random.default_rng(args.seed)
    words = ["the", "model", "serves", "tokens", "fast", "over", "http", "and", "batches", "them", "well"]
    out = []
    for _ in range(args.requests):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(args.min_prompt, args.max_prompt + 1))))
        out.append((prompt, int(rng.integers(args.min_output, args.max_output + 1))))
    return out


def summary(name: str, wall: float, requests: int, tokens: int, ttft: list[float], itl: list[float]) -> dict:
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"mode": name, "requests/s": requests / wall, "output tok/s": tokens / wall, "ttft p50 ms": pct(ttft, 50),
            "ttft p99 ms": pct(ttft, 99), "itl p50 ms": pct(itl, 50), "itl p99 ms": pct(itl, 99), "wall s": wall}


async def run_clients(url: str, model: str, work: list[tuple[str, int]], clients: int) -> dict:
    import openai

    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    ttft, itl, tokens = [], [], 0

    async def client_loop() -> None:
        nonlocal tokens
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
        while not queue.empty():
            prompt, max_tokens = queue.get_nowait()
            start = time.perf_counter()
            last = None
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if not chunk.choices:
                    continue
                now = time.perf_counter()
                (ttft.append(now - start) if last is None else itl.append(now - last))
                last = now
                tokens += 1
        await client.close()

    began = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return summary(f"server, {clients} clients", time.perf_counter() - began, len(work), tokens, ttft, itl)


def run_offline(args: argparse.Namespace, work: list[tuple[str, int]]) -> dict:
    from hfrewrite.compiler.build import CompileOptions, compile_model
    from hfrewrite.compiler.sources import load_tokenizer
    from hfrewrite.runtime.generation import ByteTokenizer, Generator, encode_prompt
    from hfrewrite.runtime.kv_cache import CacheConfig
    from hfrewrite.runtime.sampling import SamplingParams

    result = compile_model(args.model, CompileOptions(verify=False, backend=None if args.backend == "none" else
                                                      args.backend, progress=False))
    tokenizer = load_tokenizer(result.source) or ByteTokenizer(int(result.model.config.vocab_size))
    generator = Generator(result.model, tokenizer, CacheConfig(16, 512))
    generator.engine.max_running = args.clients
    prompts = [encode_prompt(tokenizer, p, chat=False) for p, _ in work]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for _, n in work]
    ttft, itl, last, tokens, wall = [], [], {}, 0, [0.0]

    def drive() -> None:  # on a thread of its own, as in the server (torch's CPU threading differs off the main thread)
        nonlocal tokens
        generator.generate_ids(prompts[:2], params[0])  # warm up (compiles with inductor)
        began = time.perf_counter()
        for event in generator.stream(prompts, params):
            if event.token_id is None:
                continue
            now = time.perf_counter()
            (itl.append(now - last[event.request_id]) if event.request_id in last else ttft.append(now - began))
            last[event.request_id] = now
            tokens += 1
        wall[0] = time.perf_counter() - began

    thread = threading.Thread(target=drive)
    thread.start()
    thread.join()
    return summary(f"offline engine, max {args.clients} running", wall[0], len(work), tokens, ttft, itl)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=4)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--min-output", type=int, default=8)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-server", action="store_true")
    parser.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    work = workload(args)
    process, url = (None, args.url) if args.url else start(args)
    try:
        asyncio.run(run_clients(url, args.model, work[:args.clients], args.clients))  # warm up
        rows = [asyncio.run(run_clients(url, args.model, work, args.clients))]
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    rows.append(run_offline(args, work))
    keys = list(rows[0])
    lines = [f"`python bench/bench_serve.py {' '.join(sys.argv[1:])}` on {platform.machine()} "
             f"({os.cpu_count()} cores), {args.model}, backend {args.backend}:", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in row.values()) + " |")
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
