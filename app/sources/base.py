"""The model-source interface: what vit-serve asks of a library that models come from, and what a source gives back.

A source (torchvision, Hugging Face, timm: one module each beside this one) builds a model from its `model.toml`,
with its labels and its library's exact preprocessing; it may split off the head for embeddings and read the attention
for explanations, and answers None for what it cannot do. `registry` maps `arch` to a source; nothing outside
`app.sources` knows which source a model came from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from torch import nn

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError
from app.pipeline.preprocess import Preprocessor, PreprocessParams, build_preprocessor
from app.sources.attention import AttentionReader
from app.sources.embedding import WithEmbedding

Triple = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """A model's exact input pipeline: what its library does to an image before the forward pass."""

    transform: Preprocessor  # RGB PIL image -> (3, side, side) float32
    info: dict[str, Any]  # its parameters, as the model's description shows them
    mean: Triple = (0.0, 0.0, 0.0)  # the normalization, undone to draw an explanation over the image the model saw
    std: Triple = (1.0, 1.0, 1.0)
    # `transform` also takes (3, h, w) and (n, 3, h, w) uint8 tensors, so JPEGs may be decoded on a GPU
    takes_tensors: bool = False
    # the side the image's short side is resized to, first; None: the processor does not resize that way
    resize_side: int | None = None
    # a JPEG may be decoded at a reduced scale down to `resize_side` (the opt-in `jpeg_draft`), close to exact
    jpeg_draft: bool = False

    @classmethod
    def of_preset(cls, params: PreprocessParams) -> Preprocessing:
        """torchvision's `ImageClassification` preset with `params`: exact on PIL images and uint8 tensors alike."""
        return cls(
            build_preprocessor(params),
            params.as_dict(),
            mean=params.mean,
            std=params.std,
            takes_tensors=True,
            resize_side=params.resize_size,
            jpeg_draft=True,
        )


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to serve: the module, what travels with its weights, and what can be done with it besides
    classifying (None: the source cannot do it for this model). A source's `load` gives it on the CPU; the registry's
    `load_model` gives it in eval mode on its device, with `embedding` and `attention` asked of the source."""

    module: nn.Module  # (n, 3, side, side) pixels -> (n, num_classes) logits
    labels: list[str]
    preprocessing: Preprocessing
    image_size: int  # side of the square input
    weights_source: str  # where the weights came from, as the model's description shows it
    num_params: int
    embedding: WithEmbedding | None = None  # pixels -> [logits | embedding], sharing the module's weights
    attention: AttentionReader | None = None  # pixels -> logits and every layer's attention, in one forward

    @classmethod
    def of(cls, module: nn.Module, labels: list[str], preprocessing: Preprocessing, weights_source: str) -> LoadedModel:
        """What a source's `load` returns: the input side measured from the preprocessing, the parameters counted."""
        return cls(
            module=module,
            labels=labels,
            preprocessing=preprocessing,
            image_size=_input_side(preprocessing.transform),
            weights_source=weights_source,
            num_params=sum(p.numel() for p in module.parameters()),
        )


class ModelSource(ABC):
    """A library models come from. `load` builds one on the CPU; the registry then moves it to its device and asks
    `split_head` and `attention`, which answer None where the source cannot do that for the model (the defaults)."""

    archs: ClassVar[str]  # how model.toml's `arch` names this source's models, e.g. '"timm:<timm model name>"'

    @abstractmethod
    def handles(self, arch: str) -> bool:
        """Whether `arch` (model.toml) names one of this source's models."""

    def check(self, config: ModelConfig) -> None:
        """Refuse a model.toml this source cannot load, before any weights are read: raise `ModelLoadError` (one line,
        saying what to change; `refuse` makes one). The default accepts every config."""
        return None

    @abstractmethod
    def load(self, config: ModelConfig, *, cache_dir: Path | None) -> LoadedModel:
        """Build the module with its weights, labels and preprocessing, on the CPU (`LoadedModel.of`). Raises
        `ModelLoadError`. `cache_dir`: where downloaded weights are kept (None: the library's default)."""

    def download(self, config: ModelConfig, cache_dir: Path | None) -> Path | None:
        """Fetch the weights `load` would fetch, for image builds: the file, or None when nothing is fetched."""
        return None

    def split_head(self, module: nn.Module, image_size: int) -> WithEmbedding | None:
        """`module` (on its device) as [logits | embedding] in one forward, or None: served without embeddings."""
        return None

    def attention(self, module: nn.Module) -> AttentionReader | None:
        """How to read `module`'s attention, or None: it cannot be explained."""
        return None

    def refuse(self, config: ModelConfig, problem: str) -> ModelLoadError:
        """A config problem as one line naming the model and its file."""
        return ModelLoadError(f"model {config.name!r}: {config.file}: {problem}")


def _input_side(transform: Preprocessor) -> int:
    """The side of the square input the preprocessing gives (run once on a blank image)."""
    pixels = transform(Image.new("RGB", (97, 83)))
    if pixels.dim() != 3 or pixels.shape[0] != 3 or pixels.shape[1] != pixels.shape[2]:
        raise ModelLoadError(f"preprocessing gives {list(pixels.shape)}; vit-serve serves square 3-channel inputs")
    return int(pixels.shape[1])
