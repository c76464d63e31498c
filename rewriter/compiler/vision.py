"""The vision side of a vision-language model: its HF processor and its compiled vision tower.

The processor is the model's own (AutoImageProcessor + tokenizer + the processor class transformers
names for the model type); images are never preprocessed by hand. Without torchvision transformers
cannot build a video processor, and its processors refuse a missing one, so the processor is built
from its image and text parts only (videos are then unsupported); with torchvision its video processor
is part of it. A video's features (Qwen2-VL: frames in temporal patches) come from the model's own
get_video_features, at the video tokens. A processor module that imports a helper from the torchvision
image processor (Pixtral's, for Mistral 3) is imported with that module read from its Pillow twin, which
defines the same helpers (`find_processor_class`).

The vision tower is the HF module (patch embedding, blocks, merger / projector) on the checkpoint's
weights, its attention plain SDPA (non-paged, non-causal: every patch of an image sees every other),
run through torch.compile with dynamic shapes (images of different sizes share the graph), over the
images of all the prompts a step resolves at once (hfrewrite.runtime.tower_batch joins them).
Its data-dependent preamble (rotary positions and per-image sequence lengths from the grid) runs
inside the HF module, so nothing of it is re-implemented.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import accelerate
import torch
import transformers
from transformers import PretrainedConfig
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from hfrewrite.errors import ModelSourceError


def load_processor(directory: Path, config: PretrainedConfig) -> Any:
    """The model's HF processor from `directory` (see module docstring)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if name is None or not hasattr(transformers, name):
        raise ModelSourceError(f"transformers has no processor for model type {config.model_type!r}")
    processor_class = find_processor_class(name)
    try:
        images = AutoImageProcessor.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot read the image processor or tokenizer in {directory}: "
                               f"{str(error).splitlines()[0]}") from error
    template_file = Path(directory) / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    try:
        options = _processor_options(Path(directory) / "processor_config.json", processor_class)
        videos = _video_processor(directory, processor_class)
        if videos is not None:
            return processor_class(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                   chat_template=template, **options)
        return _image_text_only(processor_class)(image_processor=images, tokenizer=tokenizer, chat_template=template,
                                                 **options)
    except ImportError as error:  # transformers' stand-in for a processor whose backend (torchvision) is missing
        raise ModelSourceError(f"transformers' {name} for model type {config.model_type!r} cannot be built here: "
                               f"{str(error).strip().splitlines()[0]}") from error


def _video_processor(directory: Path, processor_class: type) -> Any:
    """The model's video processor where transformers can build one (it needs torchvision), else None."""
    import inspect

    from transformers.utils import is_torchvision_available

    if not is_torchvision_available() or "video_processor" not in inspect.signature(processor_class).parameters:
        return None
    from transformers import AutoVideoProcessor

    try:
        return AutoVideoProcessor.from_pretrained(directory)
    except (OSError, ValueError):   # the checkpoint ships no video processor settings
        return None


def find_processor_class(name: str) -> type:
    """transformers' processor class `name` (see the module docstring for the torchvision case).

    Without torchvision, transformers hands out a stand-in (DummyObject) for a processor whose module
    fails to import; when it fails on torchvision, the module is imported again with each of its package's
    torchvision image processor modules (image_processing_X) read from its Pillow twin
    (image_processing_pil_X), for that one import only."""
    import importlib
    import pkgutil
    import sys

    from transformers.utils.import_utils import DummyObject

    found = getattr(transformers, name)
    if not isinstance(found, DummyObject):
        return found
    module_name = found.__module__
    package_name = module_name.rpartition(".")[0]
    try:
        return getattr(importlib.import_module(module_name), name)
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise
    package = importlib.import_module(package_name)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    twins = {f"{package_name}.{leaf}": f"{package_name}.image_processing_pil_{leaf[len('image_processing_'):]}"
             for leaf in names
             if leaf.startswith("image_processing_") and not leaf.startswith("image_processing_pil_")
             and "image_processing_pil_" + leaf[len("image_processing_"):] in names}
    added = [torch_name for torch_name in sorted(twins) if torch_name not in sys.modules]
    try:
        for torch_name in added:
            sys.modules[torch_name] = importlib.import_module(twins[torch_name])
        return getattr(importlib.import_module(module_name), name)
    finally:
        for torch_name in added:
            del sys.modules[torch_name]


def _processor_options(path: Path, processor_class: type) -> dict[str, Any]:
    """The processor's own settings (patch_size, ...) from processor_config.json, those its __init__ takes."""
    import inspect
    import json

    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"cannot read {path}: {error}") from error
    taken = set(inspect.signature(processor_class.__init__).parameters) - {"self", "image_processor", "tokenizer",
                                                                            "video_processor", "chat_template"}
    return {key: value for key, value in sorted(saved.items()) if key in taken}


def _image_text_only(processor_class: type) -> type:
    """A subclass of the processor class whose parts are the image processor and the tokenizer only.

    transformers' ProcessorMixin takes its parts from __init__'s parameter names, so a subclass whose
    __init__ names no video processor drops the positional video argument the parent passes on."""

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        processor_class.__init__(self, image_processor, tokenizer, chat_template=chat_template, **no_video, **kwargs)

    import inspect

    no_video = {"video_processor": None} if "video_processor" in inspect.signature(processor_class).parameters else {}
    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "video_processor": NoVideos()})


def takes_videos(processor: Any) -> bool:
    """Whether the processor has a real video processor (not None, not the NoVideos stand-in)."""
    videos = getattr(processor, "video_processor", None)
    return videos is not None and not isinstance(videos, NoVideos)


class NoVideos:
    """Stands in for the video processor transformers cannot build without torchvision (AutoProcessor fails on
    SmolVLMVideoProcessor, ...). SmolVLM's apply_chat_template reads its frame-sampling defaults even for
    image prompts: none here (no frames are sampled); a video given to the processor is a clear error."""

    num_frames = None
    fps = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelSourceError("videos need the model's HF video processor, which transformers builds only with "
                               "torchvision installed; this processor takes images and text")


def language_prefix(model: torch.nn.Module) -> str:
    """The module path of the language model in the HF model (transformers 5: `model.language_model`)."""
    for name in ("model.language_model", "language_model", "model.text_model"):
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        return name
    raise ModelSourceError(f"cannot find the language model of {type(model).__name__}")


def image_block_ids(config: PretrainedConfig) -> Any:
    """HF's own image block ids of the model type (token_type_ids [1, n] -> image id per token, -1 for text):
    `get_block_sequence_ids_for_mask` of its modeling module (Gemma 3), or None where it has none."""
    import importlib

    from transformers.models.auto import modeling_auto

    name = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if model_class is None:
        return None
    return getattr(importlib.import_module(model_class.__module__), "get_block_sequence_ids_for_mask", None)


class VisionTower:
    """The HF model's own image features, text embeddings and position scheme, on the checkpoint's weights.

    `load(specs)` reads the named tensors (on the run device and dtype); only the vision tower, the
    projector and the input embeddings are read, the language model stays on the meta device."""

    def __init__(self, config: PretrainedConfig, load: Callable[[dict], dict], device: torch.device,
                 dtype: torch.dtype, backend: str | None) -> None:
        with accelerate.init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForImageTextToText.from_config(copy.deepcopy(config),
                                                                         attn_implementation="sdpa", dtype=dtype)
        # everything but the language model (vision tower, projector / connector), and the input embeddings
        language, embedding = language_prefix(model), model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        owned = {name: p for name, p in model.named_parameters()
                 if p is embedding or (not name.startswith(language + ".") and p is not head)}
        weights = load({name: (tuple(p.shape), p.dtype) for name, p in sorted(owned.items())})
        for name, tensor in sorted(weights.items()):
            _set(model, name, torch.nn.Parameter(tensor.to(device, dtype), requires_grad=False))
        for name, buffer in sorted(model.named_buffers()):
            if buffer.device.type != "meta":
                _set(model, name, buffer.to(device), buffer=True)
        self.model, self.config, self.device, self.dtype = model.eval(), config, device, dtype
        self.directory = Path(config._name_or_path) if config._name_or_path else None  # where the processor is
        self.parameters = len(weights)
        # HF's image block ids (Gemma 3: its images' tokens see the whole image), else None
        self.block_ids = image_block_ids(config)
        features = model.get_image_features
        self._features = features if backend is None else torch.compile(features, backend=backend, dynamic=True)
        videos = getattr(model, "get_video_features", None)   # Qwen2-VL and relatives: frames in temporal patches
        self._video_features = videos if backend is None or videos is None else torch.compile(
            videos, backend=backend, dynamic=True)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """[image tokens, hidden]: the features of every image, in order (they replace the image tokens)."""
        return self.image_outputs(pixel_values, **extra)[0]

    @torch.no_grad()
    def image_outputs(self, pixel_values: torch.Tensor,
                      **extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image_features, deepstack [L, image tokens, hidden] or None): a deepstack model's (Qwen3-VL)
        features of intermediate vision layers too, which its LM adds to the first L layers' outputs."""
        out = self._features(pixel_values.to(self.device, self.dtype),
                             **{k: v.to(self.device) for k, v in extra.items()}, return_dict=True)
        pooled = _joined(out.pooler_output)
        deep = getattr(out, "deepstack_features", None)
        return pooled, (torch.stack([_joined(layer) for layer in deep]) if deep else None)

    @property
    def deepstack_layers(self) -> int:
        """L: how many decoder layers get deepstack features added (0 for most models)."""
        vision = getattr(self.config, "vision_config", None)
        return len(getattr(vision, "deepstack_visual_indexes", None) or ())

    @torch.no_grad()
    def video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
        """[video tokens, hidden]: the features of every video (its frames' processor output), in order."""
        if self._video_features is None:
            raise ModelSourceError(f"model type {self.config.model_type!r} takes no videos")
        out = self._video_features(pixel_values_videos.to(self.device, self.dtype), video_grid_thw.to(self.device),
                                   return_dict=True)
        pooled = out.pooler_output
        pooled = torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
        return pooled.reshape(-1, pooled.shape[-1])

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, hidden] text embeddings of token ids [n] (the model's own embedding module, scaling included)."""
        return self.model.get_input_embeddings()(ids.to(self.device)[None])[0]

    def rope_index(self, ids: torch.Tensor, grids: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
        """The model's own M-RoPE positions [3, n] of a prompt and its delta (later tokens: position + delta),
        through its get_rope_index; None for models with plain positions."""
        inner = getattr(self.model, "model", self.model)
        if not hasattr(inner, "get_rope_index"):
            return None
        types = torch.zeros_like(ids, dtype=torch.int)   # text 0, image 1, video 2 (HF's mm_token_type_ids)
        for value, name in ((1, "image_token_id"), (2, "video_token_id")):
            token = getattr(self.config, name, None)
            if token is not None:
                types[ids == token] = value
        positions, delta = inner.get_rope_index(ids[None], types[None], image_grid_thw=grids.get("image_grid_thw"),
                                                video_grid_thw=grids.get("video_grid_thw"))
        return positions[:, 0], int(delta.reshape(-1)[0])


def _joined(features: torch.Tensor | list | tuple) -> torch.Tensor:
    """[tokens, hidden] of per-image features (HF splits them per image) or of one tensor."""
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    return features.reshape(-1, features.shape[-1])


def _set(model: torch.nn.Module, name: str, value: torch.Tensor, buffer: bool = False) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if buffer:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = value
