"""`arch = "hf"`: a Hugging Face Transformers image classifier from a local folder in its own layout.

The folder (`weights`, default the model folder itself) holds `config.json`, `model.safetensors` or
`pytorch_model.bin`, and `preprocessor_config.json`. The model comes from `AutoModelForImageClassification`, its
preprocessing is its own image processor (so served inputs are exactly what `processor(images=...)` gives), its labels
are `config.json`'s `id2label` unless model.toml names others. Nothing is fetched from a hub (`local_files_only`).
Embeddings (`last_hidden_state[:, 0]`, before `classifier`) and explanations are read from a
`ViTForImageClassification`; other architectures are served for classification alone. Needs the `hf` extra:
`pip install 'vit-serve[hf]'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from app.config.model_config import ModelConfig, PreprocessConfig
from app.errors import ModelLoadError
from app.sources.attention import AttentionReader, Attentions, loaded_class, softmax_weights, unmodified
from app.sources.base import LoadedModel, ModelSource, Preprocessing
from app.sources.embedding import WithEmbedding
from app.sources.extras import require
from app.sources.labels import load_labels

ARCH = "hf"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
VIT_MODULE = "transformers.models.vit.modeling_vit"


class HuggingFaceSource(ModelSource):
    archs = f'"{ARCH}"'

    def handles(self, arch: str) -> bool:
        return arch == ARCH

    def check(self, config: ModelConfig) -> None:
        if config.arch_params is not None or config.preprocess != PreprocessConfig():
            raise self.refuse(
                config,
                f"{config.arch} models bring their own architecture and preprocessing; "
                "remove [arch_params] and [preprocess]",
            )

    def load(self, config: ModelConfig, *, cache_dir: Path | None) -> LoadedModel:
        transformers = require("transformers", "hf", "Hugging Face Transformers", config)
        folder = config.resolve(config.weights or ".")  # default: the Hugging Face files in the model folder itself
        missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            missing.append(" or ".join(WEIGHT_FILES))
        if missing:
            raise ModelLoadError(
                f"model {config.name!r}: {folder} is not a Hugging Face model folder: no {', '.join(missing)} "
                "(save one with model.save_pretrained(folder) and processor.save_pretrained(folder))"
            )
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
            processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"model {config.name!r}: cannot load the Hugging Face model in {folder}: {exc}"
            ) from exc
        labels = _labels(config, model)
        settings = processor.to_dict()
        info = {"image_processor": type(processor).__name__, **_pixel_settings(settings)}
        preprocessing = Preprocessing(
            ProcessorTransform(processor),
            info,
            mean=_triple(settings.get("image_mean"), 0.0),
            std=_triple(settings.get("image_std"), 1.0),
            resize_side=_shortest_edge(settings.get("size")),
        )
        return LoadedModel.of(LogitsOf(model), labels, preprocessing, f"hf:{folder}")

    def split_head(self, module: nn.Module, image_size: int) -> WithEmbedding | None:
        model: Any = module.model if isinstance(module, LogitsOf) else None
        if model is None or not hasattr(model, "vit") or not isinstance(getattr(model, "classifier", None), nn.Module):
            return None
        return WithEmbedding(ClassTokenOutput(model), model.classifier, int(model.config.hidden_size))

    def attention(self, module: nn.Module) -> AttentionReader | None:
        readable = isinstance(module, LogitsOf) and _is_vit(module.model)
        return AttentionReader(module, _read_attention) if readable else None


class LogitsOf(nn.Module):
    """A Transformers classifier as a plain `pixels -> logits` module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(pixel_values=pixels).logits
        return logits


class ProcessorTransform:
    """The model's own image processor, one PIL image at a time: -> (3, h, w) float32."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels: torch.Tensor = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels.float()


class ClassTokenOutput(nn.Module):
    """A Transformers `ViTForImageClassification` up to its classifier: `last_hidden_state[:, 0]`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        hidden: torch.Tensor = model.vit(pixel_values=pixels).last_hidden_state
        return hidden[:, 0]


def _labels(config: ModelConfig, model: Any) -> list[str]:
    """model.toml's labels if it names any, else config.json's `id2label`; as many as the model has classes."""
    id2label = {int(k): v for k, v in (model.config.id2label or {}).items()}
    own = [id2label[i] for i in range(model.config.num_labels)] if id2label else None
    if own is not None and own == [f"LABEL_{i}" for i in range(len(own))]:
        own = None  # the library's placeholder names: let model.toml's labels or num_classes decide
    labels = load_labels(config) if config.labels is not None or own is None else own
    head = model.config.num_labels
    if len(labels) != head:
        raise ModelLoadError(f"model {config.name!r}: {len(labels)} labels for a model of {head} classes")
    return labels


def _pixel_settings(settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("size", "crop_size", "do_center_crop", "resample", "rescale_factor", "image_mean", "image_std")
    return {k: (int(v) if k == "resample" and v is not None else v) for k, v in settings.items() if k in keys}


def _shortest_edge(size: Any) -> int | None:
    """The short side a processor resizes to (`size = {"shortest_edge": n}`); None for a fixed (h, w) resize."""
    edge = size.get("shortest_edge") if isinstance(size, dict) else None
    return edge if isinstance(edge, int) else None


def _triple(value: Any, default: float) -> tuple[float, float, float]:
    if isinstance(value, list | tuple) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return (default, default, default)


def _is_vit(model: Any) -> bool:
    """An unmodified `ViTForImageClassification` whose layers `_read_attention` replays."""
    if not unmodified(model, loaded_class(VIT_MODULE, "ViTForImageClassification"), "forward") or not unmodified(
        vit := model.vit, loaded_class(VIT_MODULE, "ViTModel"), "forward"
    ):
        return False
    layer_class, attention_class = loaded_class(VIT_MODULE, "ViTLayer"), loaded_class(VIT_MODULE, "ViTAttention")
    return isinstance(vit.layers, nn.ModuleList) and all(
        unmodified(layer, layer_class, "forward")
        and unmodified(layer.attention, attention_class, "forward")
        and all(hasattr(layer.attention, name) for name in ("q_proj", "k_proj", "head_dim", "scaling"))
        for layer in vit.layers
    )


def _read_attention(logits_of: Any, pixels: torch.Tensor) -> Attentions:
    """`ViTForImageClassification.forward` (no mask, no position interpolation), layer by layer; weights on the side."""
    model = logits_of.model
    vit = model.vit
    patches = vit.embeddings.patch_embeddings
    tokens = vit.embeddings(pixels.to(patches.projection.weight.dtype))  # (n, 3, h, w) -> (n, 1 + rows * cols, hidden)
    layers = []
    for layer in vit.layers:
        attention = layer.attention
        normed = layer.layernorm_before(tokens)
        heads = (*normed.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(normed).view(heads).transpose(1, 2)  # (n, T, hidden) -> (n, heads, T, head_dim)
        key = attention.k_proj(normed).view(heads).transpose(1, 2)
        layers.append(softmax_weights(query, key, attention.scaling))
        tokens = layer(tokens)
    logits = model.classifier(vit.layernorm(tokens)[:, 0, :])
    grid = (patches.image_size[0] // patches.patch_size[0], patches.image_size[1] // patches.patch_size[1])
    return Attentions(logits.float(), layers, 1, grid)
