"""Weight loading by name: exact tensors, shape checks, ties, shards, and tensor-parallel slices."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from safetensors.torch import save_file

from hfrewrite.errors import WeightError
from hfrewrite.compiler.tiny import save_model, tiny_config, tiny_model
from hfrewrite.compiler.weights import load_weights, open_checkpoint, unused_names

CPU = torch.device("cpu")


def _specs(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters(remove_duplicate=False)}


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny gemma2 (tied embeddings: lm_head.weight is not stored) saved to disk."""
    directory = tmp_path_factory.mktemp("gemma2")
    model = tiny_model(tiny_config("gemma2"), seed=3)
    save_model(model, directory)
    return model, directory


def test_round_trip_equals_model(gemma: tuple[torch.nn.Module, Path]) -> None:
    model, directory = gemma
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_weights(directory, _specs(model), tied, CPU)
    assert sorted(loaded) == sorted(_specs(model))
    for name, param in model.named_parameters(remove_duplicate=False):
        assert torch.equal(loaded[name], param), name
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]


def test_tied_weight_without_tie_map_is_missing(gemma: tuple[torch.nn.Module, Path]) -> None:
    model, directory = gemma
    assert "lm_head.weight" not in open_checkpoint(directory)
    with pytest.raises(WeightError, match=r"lm_head\.weight.*" + str(directory)):
        load_weights(directory, _specs(model), {}, CPU)


def test_dtype_cast(gemma: tuple[torch.nn.Module, Path]) -> None:
    model, directory = gemma
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_weights(directory, _specs(model), tied, CPU, dtype=torch.bfloat16)
    name = "model.layers.1.mlp.up_proj.weight"
    assert loaded[name].dtype == torch.bfloat16
    assert torch.equal(loaded[name], model.get_parameter(name).detach().to(torch.bfloat16))


def test_missing_weight_names_it_and_a_close_match(gemma: tuple[torch.nn.Module, Path]) -> None:
    _, directory = gemma
    specs = {"model.layers.0.mlp.up_prj.weight": ((128, 64), torch.float32)}
    with pytest.raises(WeightError, match=r"up_prj\.weight.*closest name in the checkpoint: "
                                          r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_weights(directory, specs, {}, CPU)


def test_misshaped_weight_names_weight_file_and_shapes(gemma: tuple[torch.nn.Module, Path]) -> None:
    _, directory = gemma
    specs = {"model.layers.0.mlp.up_proj.weight": ((64, 128), torch.float32)}
    with pytest.raises(WeightError, match=r"up_proj\.weight.*model\.safetensors.*\(128, 64\).*\(64, 128\)"):
        load_weights(directory, specs, {}, CPU)


def test_unused_tensors_are_listed_not_fatal(gemma: tuple[torch.nn.Module, Path]) -> None:
    model, directory = gemma
    specs = {k: v for k, v in _specs(model).items() if k != "model.norm.weight"}
    loaded = load_weights(directory, specs, {"lm_head.weight": "model.embed_tokens.weight"}, CPU)
    assert "model.norm.weight" not in loaded
    with open_checkpoint(directory) as checkpoint:
        assert unused_names(checkpoint, specs, {"lm_head.weight": "model.embed_tokens.weight"}) == ["model.norm.weight"]


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    """A sharded mixtral as transformers writes it: per-expert tensors over several files, converted on load."""
    model = tiny_model(tiny_config("mixtral"), seed=1)
    save_model(model, tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    with open_checkpoint(tmp_path) as checkpoint:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in checkpoint.names()
        assert len({checkpoint.file_of(n) for n in checkpoint.names()}) > 1
    loaded = load_weights(tmp_path, _specs(model), {}, CPU)
    assert sorted(loaded) == sorted(_specs(model))
    for name, param in model.named_parameters():
        assert torch.equal(loaded[name], param), name


def test_converted_slices_equal_slices_of_the_converted_tensor(tmp_path: Path) -> None:
    """A lazy view of a converted tensor, indexed like a rank's shard, equals that slice of transformers'
    own conversion (tp 1 path), for experts merged along dim 0 and gate/up concatenated along dim 1."""
    from hfrewrite.compiler.conversion import view
    from hfrewrite.compiler.weights import checkpoint_layout

    model = tiny_model(tiny_config("qwen3_moe", num_experts=5), seed=2)
    save_model(model, tmp_path)
    whole = load_weights(tmp_path, _specs(model), {}, CPU)
    with open_checkpoint(tmp_path) as checkpoint:
        layout = checkpoint_layout(checkpoint, model.config)
        for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
            lazy = view(layout, name, checkpoint.slice)
            assert lazy.get_shape() == list(whole[name].shape)
            for index in [(slice(1, 4),), (slice(None), slice(5, 40)), (slice(2, 3), slice(0, 7)), ...]:
                assert torch.equal(lazy[index], whole[name][index]), (name, index)


def test_unindexed_files_are_merged_and_must_not_overlap(tmp_path: Path) -> None:
    save_file({"b.weight": _random(3, 4, seed=1)}, str(tmp_path / "part-b.safetensors"))
    save_file({"a.weight": _random(5, 2, seed=2)}, str(tmp_path / "part-a.safetensors"))
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.names() == ["a.weight", "b.weight"]
        assert checkpoint.file_of("a.weight").name == "part-a.safetensors"
        assert checkpoint.shape("b.weight") == (3, 4)
    loaded = load_weights(tmp_path, {"a.weight": ((5, 2), torch.float32)}, {}, CPU)
    assert torch.equal(loaded["a.weight"], _random(5, 2, seed=2))
    save_file({"a.weight": _random(5, 2, seed=3)}, str(tmp_path / "part-c.safetensors"))
    with pytest.raises(WeightError, match=r"a\.weight.*part-a\.safetensors.*part-c\.safetensors"):
        open_checkpoint(tmp_path)


def test_slicer_reads_the_matching_slice(tmp_path: Path) -> None:
    full = {"w.weight": _random(8, 6, seed=4), "e.weight": _random(10, 6, seed=5)}
    save_file(full, str(tmp_path / "model.safetensors"))
    world, rank = 2, 1
    calls: list[str] = []

    def rows(name: str, lazy: Any) -> torch.Tensor:
        calls.append(name)
        total = lazy.get_shape()[0]
        step = total // world
        return lazy[rank * step:(rank + 1) * step]

    specs = {"w.weight": ((4, 6), torch.float32), "head.weight": ((5, 6), torch.float32)}
    loaded = load_weights(tmp_path, specs, {"head.weight": "e.weight"}, CPU, slicer=rows)
    assert torch.equal(loaded["w.weight"], full["w.weight"][4:8])
    assert torch.equal(loaded["head.weight"], full["e.weight"][5:10])
    assert sorted(calls) == ["head.weight", "w.weight"]
    with pytest.raises(WeightError, match=r"w\.weight.*\(4, 6\).*\(8, 6\)"):
        load_weights(tmp_path, {"w.weight": ((8, 6), torch.float32)}, {}, CPU, slicer=rows)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02garbage-not-safetensors")
    with pytest.raises(WeightError, match="model.safetensors"):
        open_checkpoint(tmp_path)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64]),
       cut=st.data(), seed=st.integers(0, 2**31 - 1))
def test_file_slices_equal_safetensors_slices(tmp_path_factory: pytest.TempPathFactory, shape: list[int],
                                              dtype: torch.dtype, cut: st.DataObject, seed: int) -> None:
    """A rank's slices read with file reads equal safetensors' own slices, are their own memory (contiguous,
    not a view of a mapping), for any leading step-1 slice of any dim."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hfrewrite.compiler.file_slices import FileSlice, read_header

    gen = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(*shape, generator=gen) * 100).to(dtype)
    path = tmp_path_factory.mktemp("slices") / "one.safetensors"
    save_file({"w": tensor, "other": torch.randn(3, generator=gen)}, path)
    dims = cut.draw(st.integers(0, len(shape)), label="sliced dims")
    index = tuple(slice(*sorted(cut.draw(st.tuples(st.integers(0, size), st.integers(0, size)), label=f"dim {d}")))
                  for d, size in enumerate(shape[:dims]))
    start, header = read_header(path)
    ours = FileSlice(path, start, header["w"], "w")[index]
    with safe_open(str(path), framework="pt") as handle:
        theirs = handle.get_slice("w")[index]
    assert ours.dtype == theirs.dtype and ours.is_contiguous() and torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["chunk", "transpose", "interleave"])
def test_lazy_views_of_other_ops_equal_transformers_ops(tmp_path: Path, kind: str) -> None:
    """Chunk (one fused tensor -> q, k, v), Transpose, and an op without a lazy form (Interleave: read whole, then
    sliced): every slice of the view equals that slice of transformers' own op on the whole tensor."""
    from transformers.core_model_loading import Chunk, Interleave, Transpose, WeightConverter

    from hfrewrite.compiler.conversion import Rules, materialize, plan, view
    from hfrewrite.compiler.lazy_views import Computed

    tensors = {"layer.qkv.weight": _random(12, 5, seed=6), "layer.w.weight": _random(3, 6, 4, seed=7)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    converter = {
        "chunk": WeightConverter("qkv.weight", ["q.weight", "k.weight", "v.weight"], operations=[Chunk(dim=0)]),
        "transpose": WeightConverter("w.weight", "wt.weight", operations=[Transpose(1, 2)]),
        "interleave": WeightConverter("w.weight", "wi.weight", operations=[Interleave(dim=1)]),
    }[kind]
    targets = {"chunk": ["layer.q.weight", "layer.k.weight", "layer.v.weight"], "transpose": ["layer.wt.weight"],
               "interleave": ["layer.wi.weight"]}[kind]
    rules = Rules([], [converter], None, None, None, frozenset(targets))
    with open_checkpoint(tmp_path) as checkpoint:
        def meta(key: str) -> torch.Tensor:
            lazy = checkpoint.slice(key)
            return torch.empty(lazy.shape, dtype=lazy.dtype, device="meta")

        layout = plan(checkpoint.names(), rules, meta, str(tmp_path))
        assert layout.names() == sorted(targets)
        for name in targets:
            whole = materialize(layout, name, checkpoint.tensor)[name]
            lazy = view(layout, name, checkpoint.slice)
            assert isinstance(lazy, Computed) is (kind == "interleave")
            assert lazy.get_shape() == list(whole.shape)
            for index in [..., (slice(1, 3),), (slice(None), slice(1, 4)), (slice(0, 2), slice(2, 3))]:
                assert torch.equal(lazy[index], whole[index]), (name, index)
