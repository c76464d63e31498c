"""The `hfrewrite` command line end to end, in-process through `hfrewrite.cli.main` (one subprocess
test checks the entry points). Models are seeded tiny ones materialized in a temporary cache."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from hfrewrite.cli import main
from hfrewrite.compiler.sources import resolve

pytestmark = pytest.mark.timeout(300)

FAST = ["--backend", "none", "--quiet"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the module, so each tiny model is materialized once."""
    return tmp_path_factory.mktemp("hfrewrite-cache")


@pytest.fixture
def cli(cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """cli(*argv) -> (exit code, stdout, stderr), with HFREWRITE_CACHE in the temporary cache."""
    monkeypatch.setenv("HFREWRITE_CACHE", str(cache_dir))

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def tiny_config(cache_dir: Path, model_type: str) -> dict:
    """The config.json of a materialized tiny model, read as plain JSON."""
    found = [p for p in cache_dir.rglob("config.json") if json.loads(p.read_text()).get("model_type") == model_type]
    assert found, f"no materialized tiny {model_type} under {cache_dir}"
    return json.loads(found[0].read_text())


def tiny_directory(cache_dir: Path, model_type: str) -> Path:
    return next(p.parent for p in cache_dir.rglob("config.json")
                if json.loads(p.read_text()).get("model_type") == model_type)


def random_prompt(length: int) -> str:
    return "".join(random.choice(string.ascii_letters + " ") for _ in range(length)).strip() or "x"


def assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    flat = " ".join(err.split())  # the message is wrapped at 100 columns
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {err}"


# --------------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------------

def check_json_report(out: str, model: str, layers: int) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, "--json must print exactly one line"
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    assert report["model"] == model
    assert report["rules_applied"]["paged-attention"] == layers
    assert sorted(report["sites"]["paged-attention"]) == sorted(f"model.layers.{i}.self_attn" for i in range(layers))
    verify = report["verify"]
    assert verify["passed"] is True
    assert 0.0 <= verify["max_abs_err"] <= verify["atol"]
    assert verify["top1_agreement"] == 1.0  # float32 on the CPU
    assert set(report["timings"]) >= {"capture", "rewrite", "compile", "verify"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in report["timings"].values())
    return report


def test_compile_json_inductor(cli, cache_dir: Path) -> None:
    """The default backend: inductor-compiled, rewritten graph verified against HF eager."""
    code, out, err = cli("compile", "tiny:llama", "--json", "--quiet")
    assert code == 0, err
    report = check_json_report(out, "tiny:llama", tiny_config(cache_dir, "llama")["num_hidden_layers"])
    assert report["timings"]["compile"] > 0


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_compile_json_eager_graph(cli, cache_dir: Path, model_type: str) -> None:
    code, out, err = cli("compile", f"tiny:{model_type}", "--json", *FAST)
    assert code == 0, err
    check_json_report(out, f"tiny:{model_type}", tiny_config(cache_dir, model_type)["num_hidden_layers"])


def test_compile_text_report(cli, cache_dir: Path) -> None:
    code, out, err = cli("compile", "tiny:llama", "--no-verify", *FAST)
    assert code == 0, err
    layers = tiny_config(cache_dir, "llama")["num_hidden_layers"]
    assert re.search(rf"paged-attention\s+x{layers}\b", out), out
    assert "skipped" in out


def test_compile_save(cli, tmp_path: Path) -> None:
    target = tmp_path / "artifact" / "nested"
    code, out, err = cli("compile", "tiny:qwen3", "--no-verify", "--json", "--save", str(target), *FAST)
    assert code == 0, err
    assert sorted(p.name for p in target.iterdir()) == ["graph.py", "graph.txt", "report.json"]
    assert json.loads((target / "report.json").read_text()) == json.loads(out)
    code_text = (target / "graph.py").read_text()
    compile(code_text, "graph.py", "exec")  # valid Python
    assert "paged_attention" in code_text and "paged_attention" in (target / "graph.txt").read_text()


# --------------------------------------------------------------------------------------------------
# explain and rule files
# --------------------------------------------------------------------------------------------------

def test_explain_lists_rule_and_sites(cli, cache_dir: Path) -> None:
    code, out, err = cli("explain", "tiny:llama", *FAST)
    assert code == 0, err
    layers = tiny_config(cache_dir, "llama")["num_hidden_layers"]
    assert "rule paged-attention" in out
    section = out.split("rule paged-attention", 1)[1].split("\nrule ", 1)[0]
    assert f"matched {layers} sites" in section
    for i in range(layers):
        assert f"model.layers.{i}.self_attn" in section


MALFORMED = """\
- name: broken
  doc: an unclosed flow mapping
  match: {op: aten.linear
  rewrite: {template: paged_attention}
"""


def test_malformed_yaml_names_file_and_line(cli, tmp_path: Path) -> None:
    path = tmp_path / "broken_rules.yaml"
    path.write_text(MALFORMED)
    with pytest.raises(yaml.YAMLError) as raised:
        yaml.safe_load(MALFORMED)
    line = raised.value.problem_mark.line + 1  # PyYAML's own idea of where it breaks
    code, _, err = cli("compile", "tiny:llama", "--no-verify", "--rules", str(path), *FAST)
    assert_clean_error(code, err, "RuleError", f"{path.name}:{line}")


def test_unknown_template_names_the_rule(cli, tmp_path: Path) -> None:
    path = tmp_path / "unknown_template.yaml"
    path.write_text("- name: my-odd-rule\n  doc: uses a template nobody registered\n"
                    "  match: {op: aten.linear}\n  rewrite: {template: no_such_template_xyz}\n")
    code, _, err = cli("explain", "tiny:llama", "--rules", str(path), *FAST)
    assert_clean_error(code, err, "my-odd-rule", "no_such_template_xyz", path.name)


def test_rule_matching_nothing_warns(cli, tmp_path: Path) -> None:
    path = tmp_path / "never.yaml"
    path.write_text("- name: never-matching-rule\n  doc: scope that no module has\n"
                    "  match: {op: aten.linear, scope: no_such_module}\n  rewrite: {template: select_logit_rows}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli("compile", "tiny:llama", "--no-verify", "--rules", str(path), *FAST)
    assert code == 0, err
    assert re.search(r"warning: .*never-matching-rule", out), out
    assert any("never-matching-rule" in str(w.message) for w in caught)
    code, out, err = cli("compile", "tiny:llama", "--no-verify", "--json", "--rules", str(path), *FAST)
    assert code == 0 and "never-matching-rule" in json.loads(out)["unmatched_rules"]


# --------------------------------------------------------------------------------------------------
# model sources
# --------------------------------------------------------------------------------------------------

def test_unknown_model_type_suggests_close_names(cli) -> None:
    from transformers import CONFIG_MAPPING

    code, _, err = cli("compile", "tiny:not_a_model_type", *FAST)
    assert_clean_error(code, err, "not_a_model_type", "did you mean")
    suggested = " ".join(err.split()).split("did you mean", 1)[1].strip(" ?\n").split(", ")
    assert suggested and all(name in CONFIG_MAPPING for name in suggested), suggested
    code, _, err = cli("compile", "tiny:lama", *FAST)
    assert_clean_error(code, err, "did you mean", "llama")


def test_pickle_only_directory_is_refused_unloaded(cli, tmp_path: Path) -> None:
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this creates `marker`: proof the file was never loaded
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    code, _, err = cli("compile", str(model_dir), *FAST)
    assert_clean_error(code, err, "pickle", "pytorch_model.bin")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------

def test_generate_matches_transformers_greedy(cli, cache_dir: Path) -> None:
    """Tiny models have no tokenizer: the byte stand-in prints token ids, compared with HF's generate."""
    from transformers import AutoModelForCausalLM

    prompt = random_prompt(random.randint(3, 30))
    code, out, err = cli("generate", "tiny:qwen3", "--prompt", prompt, "--max-new-tokens", "5", *FAST)
    assert code == 0, err
    assert out.strip(), "generate printed nothing"
    printed = [int(x) for x in out.split()]
    config = tiny_config(cache_dir, "qwen3")
    ids = torch.tensor([[b % config["vocab_size"] for b in prompt.encode()]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_directory(cache_dir, "qwen3"), attn_implementation="eager")
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                      do_sample=False)[0, ids.shape[1]:].tolist()
    assert printed == expected, prompt
    assert 1 <= len(printed) <= 5


def test_generate_over_the_context_is_refused(cli, cache_dir: Path) -> None:
    resolve("tiny:llama", cache_dir=cache_dir, progress=False)  # materialize to read the context size
    context = tiny_config(cache_dir, "llama")["max_position_embeddings"]
    code, out, err = cli("generate", "tiny:llama", "--prompt", random_prompt(8), "--max-new-tokens",
                         str(context + random.randint(1, 50)), *FAST)
    assert_clean_error(code, err, f"context of {context}", "refused")


def test_generate_refuses_one_prompt_and_serves_the_other(cli, cache_dir: Path) -> None:
    resolve("tiny:llama", cache_dir=cache_dir, progress=False)
    context = tiny_config(cache_dir, "llama")["max_position_embeddings"]
    short, long = random_prompt(10), "y" * (context + random.randint(1, 100))
    code, out, err = cli("generate", "tiny:llama", "--prompt", short, "--prompt", long, "--max-new-tokens", "4",
                         *FAST)
    assert_clean_error(code, err, "request 1 refused", f"context of {context}")
    assert f"[0] {short!r}" in out and "[1]" not in out


@pytest.mark.parametrize("flag", [["--block-size", "0"], ["--num-blocks", "0"], ["--max-new-tokens", "0"],
                                  ["--max-new-tokens", "-3"]])
def test_generate_bad_numbers_are_user_errors(cli, flag: list[str]) -> None:
    code, _, err = cli("generate", "tiny:llama", "--prompt", random_prompt(12), *flag, *FAST)
    assert_clean_error(code, err, flag[0].lstrip("-").replace("-", "_"))


@pytest.mark.parametrize("top_p", ["0", "0.3"])
def test_generate_sampling_is_seeded(cli, top_p: str) -> None:
    prompt = random_prompt(12)
    seed = str(random.randint(0, 2**31))
    argv = ["generate", "tiny:llama", "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "1.3",
            "--top-p", top_p, "--seed", seed, *FAST]
    first, second = cli(*argv), cli(*argv)
    assert first[0] == 0, first[2]
    assert first[1] == second[1] and first[1].strip()


# --------------------------------------------------------------------------------------------------
# help and entry points
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["compile"], ["explain"], ["generate"], ["bench"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hfrewrite") and (not command or command[0] in out.splitlines()[0])


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_entry_points() -> None:
    module = subprocess.run([sys.executable, "-m", "hfrewrite.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert module.returncode == 0, module.stderr
    assert all(c in module.stdout for c in ("compile", "explain", "generate", "bench"))
    script = shutil.which("hfrewrite")
    if script is None:
        pytest.skip("the hfrewrite console script is not on PATH")
    result = subprocess.run([script, "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--max-new-tokens" in result.stdout, result.stderr
