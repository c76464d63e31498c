"""What `hfrewrite compile` prints: a dict for --json, a short text otherwise, and the --save artifact."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hfrewrite.compiler.options import CompileResult
from hfrewrite.errors import ArtifactError


def compile_report(result: CompileResult) -> dict:
    """The JSON report: model, rules_applied, verify, timings, and what was left unmatched."""
    rewrite = result.rewrite.to_dict()
    verification = result.verification.to_dict() if result.verification is not None else None
    return {
        "model": result.source.name,
        "source": result.source.kind,
        "model_type": result.source.config.model_type,
        "device": str(result.model.device),
        "dtype": str(result.model.dtype).replace("torch.", ""),
        "parameters": result.model.parameter_count(),
        "rules_applied": rewrite.get("applied", {}),
        "sites": rewrite.get("sites", {}),
        "unmatched_rules": rewrite.get("unmatched_rules", []),
        "remaining_ops": rewrite.get("remaining_ops", {}),
        "kv_cache_sites": len(result.model.kv_specs),
        "tp": result.model.tp,
        "ep": result.ep,
        "pp": _pipeline_report(result.model),
        "device_graphs": _device_graph_report(result.model),
        "compile": getattr(result.model, "compile_info", lambda: None)(),
        "verify": verification if verification is not None else {"passed": None, "skipped": True},
        "timings": result.timings,
    }


def _device_graph_report(model: object) -> dict | None:
    """Buckets, capture time and memory of the decode graphs captured at compile; None when none were."""
    reports = getattr(model, "graph_reports", lambda: [])()
    return reports[0] if reports else None


def _pipeline_report(model: object) -> dict | None:
    """The pipeline cut (stages, layers, crossing tensors) of a pipelined model; None on one stage."""
    split = getattr(model, "split", None)
    return split.to_dict() if split is not None else None


def format_compile_report(report: dict) -> str:
    """Human-readable form of `compile_report`."""
    lines = [f"model        {report['model']} ({report['model_type']}, {report['source']}) on {report['device']}, "
             f"{report['dtype']}",
             f"parameters   {report['parameters']:,}" + (f" on rank 0 of tp {report['tp']}" if report.get("tp", 1) > 1
                                                        else "")]
    lines.append("rules applied")
    for name, count in report["rules_applied"].items():
        lines.append(f"  {name:<28} x{count}")
    for name in report["unmatched_rules"]:
        lines.append(f"  warning: rule {name} matched nothing")
    if report["remaining_ops"]:
        left = ", ".join(f"{op} x{n}" for op, n in report["remaining_ops"].items())
        lines.append(f"left unmatched  {left}")
    compiled = report.get("compile")
    if compiled and compiled.get("groups"):
        lines.append(f"compiled     layer-wise: {compiled['pieces']} pieces in {len(compiled['groups'])} groups of "
                     f"{', '.join(str(len(g)) for g in compiled['groups'])}, {compiled['compilations']} compilations")
    graphs = report.get("device_graphs")
    if graphs:
        lines.append(f"cuda graphs  decode buckets {','.join(str(b) for b in graphs['buckets'])}: captured in "
                     f"{graphs['capture_s']} s, {graphs['capture_mib']} MiB")
    pipeline = report.get("pp")
    if pipeline:
        lines.append(f"pipeline     {pipeline['stages']} stages over {pipeline['layers_module']} "
                     f"({'pp_plan' if pipeline['plan'] == 'pp_plan' else 'derived: no pp_plan'})")
        for stage in pipeline["per_stage"]:
            layers = "-".join(str(i) for i in dict.fromkeys(stage["layers"]))
            sends = "; ".join(stage["sends"]) or "logits"
            lines.append(f"  stage {stage['stage']}  layers {layers:<7} {stage['parameters']:>12,} params  -> {sends}")
        for name, stages in pipeline["shared_parameters"].items():
            lines.append(f"  {name} on stages {', '.join(map(str, stages))} (tied weight)")
    verify = report["verify"]
    if verify.get("skipped"):
        lines.append("verify       skipped (--no-verify)")
    else:
        status = "PASSED" if verify["passed"] else "FAILED"
        if "min_cosine" in verify:  # an embedding model (hfrewrite.compiler.kinds.embedding)
            lines.append(f"verify       {status}: max |hidden err| {verify['max_abs_err']:.2e} (tol {verify['atol']:.0e}), "
                         f"min cosine {verify['min_cosine']:.6f} of {verify['pooling']} embeddings over "
                         f"{verify['tokens_compared']} tokens of {verify['sequences']} packed sequences vs HF eager")
        else:
            tolerance = verify.get("tolerance")
            # half precision: the bound is on the mean error against the fp32 oracle, printed below
            half = verify.get("oracle_err") is not None and tolerance is not None
            bound = "" if half else f" (tol {tolerance if tolerance is not None else verify['atol']:.1e})"
            lines.append(f"verify       {status}: max |logit err| {verify['max_abs_err']:.2e}{bound}, "
                         f"top-1 agreement {verify['top1_agreement']:.3f} over {verify['tokens_compared']} tokens "
                         f"of {verify['sequences']} packed sequences vs HF eager")
            if half:
                lines.append(f"             mean |logit err| vs the fp32 oracle {verify['oracle_err']:.2e} "
                             f"(bound {tolerance:.2e}: a small multiple of HF eager's own in this dtype, "
                             f"{verify['reference_oracle_err']:.2e})")
            if verify.get("reason"):
                lines.append(f"             {verify['reason']}")
    timing = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in report["timings"].items())
    lines.append(f"timings      {timing}")
    return "\n".join(lines)


def check_save_target(directory: Path) -> None:
    """Fail before any work when `directory` cannot become the --save artifact (a file, or not writable)."""
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"--save {directory}: it is a file, not a directory; give a directory to write to")
    parent = directory.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ArtifactError(f"--save {directory}: {existing} is a file, so the directory cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArtifactError(f"--save {directory}: {existing} is not writable")


def save_artifact(result: CompileResult, report: dict, directory: Path) -> None:
    """Write the rewritten graph's code, its readable listing and the report to `directory`, atomically.

    Everything goes to a temporary directory beside it, which then replaces `directory` under a lock,
    so a reader sees the old artifact or the new one, and concurrent writers do not mix their files.
    """
    stage_modules = getattr(result.model, "graph_modules", None)  # pipelined: one graph per stage
    named = [(f"stage{i}", module) for i, module in enumerate(stage_modules)] if stage_modules else \
        [("graph", result.model.graph_module)]
    check_save_target(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            for name, graph_module in named:
                (temp / f"{name}.py").write_text(graph_module.code)
                (temp / f"{name}.txt").write_text(str(graph_module.graph))
            (temp / "report.json").write_text(json.dumps(report, indent=2))
            os.chmod(temp, 0o755)
            with _locked(directory.parent / f".{directory.name}.lock"):
                _replace(temp, directory)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    except OSError as error:
        raise ArtifactError(f"--save {directory}: cannot write the artifact: {error.strerror or error}"
                            f"{f' ({error.filename})' if error.filename else ''}") from error


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed) for the block."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace(temp: Path, directory: Path) -> None:
    """Put `temp` where `directory` is: move the old one aside, rename the new one in, delete the old."""
    old = None
    if directory.exists():
        if not directory.is_dir():
            raise ArtifactError(f"--save {directory}: it is a file, not a directory")
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent)) / directory.name
        os.rename(directory, old)
    os.rename(temp, directory)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
