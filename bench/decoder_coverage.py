"""Which decoder LM types of the installed transformers `hfrewrite compile tiny:<type>` still fails on.

Every model type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (sorted), compiled and verified against HF eager
by the CLI in its own process (`--backend none`: the rewrite and verification, not inductor's compile
time), with a time limit per type. Prints one line per type, `type: ok` or `type: FAIL <reason>` (the
last line of the error), then the failing ones again. Slow (minutes per dozen types on two cores): run
it once per transformers upgrade, or with type names as arguments for a few.

    python bench/decoder_coverage.py [TYPE ...] [--limit SECONDS]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HFREWRITE = Path(sys.executable).with_name("hfrewrite")


def check(model_type: str, limit: float) -> str | None:
    """None when it compiles and verifies, else the one-line reason."""
    command = [str(HFREWRITE), "compile", f"tiny:{model_type}", "--backend", "none", "--quiet", "--device", "cpu"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return f"no answer within {limit:.0f} s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()
             and "Warning" not in line and not line.startswith("warnings.warn")]
    # the CLI prints `hfrewrite compile: error: <kind>` and then the message: keep the message's first lines
    for index, line in enumerate(lines):
        if line.startswith("hfrewrite compile: error:"):
            return " ".join([line.split("error:", 1)[1].strip(), *lines[index + 1:index + 3]])[:300]
    return (lines[-1] if lines else f"exit {done.returncode}")[:300]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: every causal LM type)")
    parser.add_argument("--limit", type=float, default=240.0, help="seconds per type")
    args = parser.parse_args()
    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    failing: dict[str, str] = {}
    for model_type in types:
        reason = check(model_type, args.limit)
        print(f"{model_type}: ok" if reason is None else f"{model_type}: FAIL {reason}", flush=True)
        if reason is not None:
            failing[model_type] = reason
    print(f"\n{len(failing)} of {len(types)} types fail:")
    for model_type, reason in failing.items():
        print(f"  {model_type}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
