"""The model-source interface: a new source is one class, registered, and served through every endpoint that its
declarations allow; torchvision's preset built from public transforms is the weights' own, bit for bit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch import nn
from torchvision.models import ViT_B_16_Weights

from app.config.model_config import ModelConfig
from app.config.settings import Settings
from app.engine.facade import Engine
from app.errors import ModelLoadError
from app.pipeline.preprocess import PreprocessParams, build_preprocessor, preset_params
from app.sources import registry
from app.sources.base import LoadedModel, ModelSource, Preprocessing
from app.sources.embedding import WithEmbedding
from app.sources.labels import load_labels
from tests.support.inprocess import serve_in_process

SIDE = 16
PARAMS = PreprocessParams(crop_size=SIDE, resize_size=SIDE)


class ChannelMeans(nn.Module):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))  # (n, 3, h, w) -> (n, 3)


class MeanColour(nn.Module):
    """Logits: a seeded linear map of each image's channel means."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = ChannelMeans()
        self.head = nn.Linear(3, num_classes)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, 3, generator=generator))
            self.head.bias.copy_(torch.randn(num_classes, generator=generator))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(pixels))
        return logits


class MeanColourSource(ModelSource):
    """A whole source: `arch = "mean-colour"`; embeddings (the channel means), no explanations."""

    archs = '"mean-colour"'

    def handles(self, arch: str) -> bool:
        return arch == "mean-colour"

    def check(self, config: ModelConfig) -> None:
        if config.num_classes is None:
            raise self.refuse(config, "mean-colour models need num_classes")

    def load(self, config: ModelConfig, *, cache_dir: Path | None) -> LoadedModel:
        assert config.num_classes is not None  # checked
        preprocessing = Preprocessing(build_preprocessor(PARAMS), PARAMS.as_dict())
        return LoadedModel.of(MeanColour(config.num_classes), load_labels(config), preprocessing, "mean-colour")

    def split_head(self, module: nn.Module, image_size: int) -> WithEmbedding | None:
        assert isinstance(module, MeanColour)
        return WithEmbedding(module.features, module.head, 3)


@pytest.fixture
def mean_colour(monkeypatch: pytest.MonkeyPatch) -> MeanColourSource:
    monkeypatch.setattr(registry, "SOURCES", list(registry.SOURCES))  # registered for this test alone
    source = MeanColourSource()
    registry.register(source)
    return source


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def test_a_registered_source_is_served_through_the_engine_and_http(
    tmp_path: Path, mean_colour: MeanColourSource
) -> None:
    (tmp_path / "colours").mkdir()
    (tmp_path / "colours" / "model.toml").write_text('arch = "mean-colour"\nnum_classes = 4\n')
    settings = Settings(model_repository=tmp_path, model=["colours"], max_batch_size=4)
    images = [jpeg(skdata.chelsea()), jpeg(skdata.coffee())]
    files = [("image", (f"{i}.jpg", body, "image/jpeg")) for i, body in enumerate(images)]
    async with serve_in_process(Engine.load(settings), settings) as client:
        classified = await client.post("/v1/classify", files=files, params={"top_k": 2})
        embedded = await client.post("/v1/embed", files=files)
        explained = await client.post("/v1/explain", files=files)
        described = await client.get("/v1/models/colours")
    assert classified.status_code == 200, classified.text
    module = MeanColour(4)
    pixels = torch.stack([build_preprocessor(PARAMS)(Image.open(io.BytesIO(body)).convert("RGB")) for body in images])
    with torch.inference_mode():
        expected_logits, expected_means = module(pixels).numpy(), pixels.mean(dim=(2, 3)).numpy()
    predictions = classified.json()["predictions"]
    np.testing.assert_allclose([p["logits"] for p in predictions], expected_logits, atol=1e-6)
    assert [p["top_k"][0]["label"] for p in predictions] == [str(i) for i in expected_logits.argmax(axis=1)]
    assert embedded.status_code == 200, embedded.text
    np.testing.assert_allclose(embedded.json()["embeddings"], expected_means, atol=1e-6)
    assert (explained.status_code, explained.json()["code"]) == (422, "explain_unsupported")  # declared: none
    assert described.status_code == 200, described.text
    assert described.json()["arch"] == "mean-colour" and described.json()["input_size"] == [3, SIDE, SIDE]


def test_an_unknown_arch_names_every_registered_source(tmp_path: Path, mean_colour: MeanColourSource) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.toml").write_text('arch = "resnet50"\nweights = "random"\n')
    with pytest.raises(ModelLoadError, match="unknown arch 'resnet50'") as caught:
        registry.read_config(tmp_path, "m")
    for archs in ('vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, "vit"', '"hf"', '"timm:<', '"mean-colour"'):
        assert archs in str(caught.value)
    (tmp_path / "m" / "model.toml").write_text('arch = "mean-colour"\n')
    with pytest.raises(ModelLoadError, match="mean-colour models need num_classes"):
        registry.read_config(tmp_path, "m")  # the source's own check, before any weights are read


@pytest.mark.parametrize(
    "weights", [ViT_B_16_Weights.IMAGENET1K_V1, ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1], ids=["bilinear", "bicubic"]
)
def test_the_preset_from_public_transforms_is_the_weights_own_bit_for_bit(weights: ViT_B_16_Weights) -> None:
    """PIL images (the CPU path) and uint8 tensors, one or a batch (the GPU-decode path), as `weights.transforms()`."""
    ours = build_preprocessor(PreprocessParams(**preset_params(weights.transforms)))
    theirs = weights.transforms()
    photo = skdata.astronaut()[40:, 10:]  # 472x502: not square, not the crop
    tensor = torch.from_numpy(photo).permute(2, 0, 1).contiguous()  # (h, w, 3) -> (3, h, w)
    for image in (Image.fromarray(photo), tensor, torch.stack([tensor, tensor.flip(-1)])):
        assert torch.equal(ours(image), theirs(image))
