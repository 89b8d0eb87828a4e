"""Test doubles and builders: a deterministic fake ViT that records its batches, tiny real ViT folders, images."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from app.config.settings import AccelerationConfig, BatchingConfig
from app.engine.facade import Engine, Limits
from app.engine.served_model import ServedModel
from app.pipeline.image_scan import ImageLimits
from app.pipeline.preprocess import PreprocessParams, build_preprocessor
from app.sources.base import LoadedModel, Preprocessing

if TYPE_CHECKING:
    import transformers

FAKE_IMAGE_SIZE = 32
FAKE_CLASSES = 10
FAKE_PREPROCESS = PreprocessParams(crop_size=FAKE_IMAGE_SIZE, resize_size=36)


class FakeViT(nn.Module):
    """Logits are a fixed linear map of each image's per-channel means: different images, different answers.

    Records every batch size it sees; `gate` (when cleared) holds the forward so tests can build up a queue,
    `fail_next` makes the next forward raise, `oom_above` makes any batch larger than it run out of memory
    (as CUDA would), and `batch_time_s` makes every forward take that long whatever its size (as a GPU would).
    """

    def __init__(self, num_classes: int = FAKE_CLASSES) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.weight = nn.Parameter(torch.randn(3, num_classes, generator=generator), requires_grad=False)
        self.batch_sizes: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.oom_above: int | None = None
        self.batch_time_s = 0.0

    def hold(self) -> None:
        """The next forward waits at the gate until `release`."""
        self.gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self.gate.set()

    async def wait_until_in_forward(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "the model was never called"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        if self.batch_time_s:
            time.sleep(self.batch_time_s)
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: a batch of {x.shape[0]})")
        return x.mean(dim=(2, 3)) @ self.weight  # (n, 3, h, w) -> (n, 3) -> (n, num_classes)


CPU_ACCELERATION = AccelerationConfig(
    compile=False,
    cuda_graphs=True,  # the defaults: nothing on a CPU
    batch_buckets=[],
    decode_device="auto",
    decode_backend="auto",
    jpeg_draft=False,
    batch_memory_fraction=0.5,
    pipeline_depth=0,
)


def fake_served_model(
    name: str = "fake",
    *,
    module: FakeViT | None = None,
    batching: BatchingConfig | None = None,
    acceleration: AccelerationConfig | None = None,
) -> ServedModel:
    module = module or FakeViT()
    num_classes = module.weight.shape[1]
    loaded = LoadedModel(
        module=module,
        labels=[f"class{i}" for i in range(num_classes)],
        preprocessing=Preprocessing.of_preset(FAKE_PREPROCESS),
        image_size=FAKE_IMAGE_SIZE,
        weights_source="fake",
        num_params=module.weight.numel(),
    )
    return ServedModel(
        name,
        "fake",
        loaded,
        device=torch.device("cpu"),
        dtype=torch.float32,
        batching=batching or BatchingConfig(max_batch_size=8, max_queue_delay_ms=2, max_queue_size=64),
        acceleration=acceleration or CPU_ACCELERATION,
    )


def fake_engine(*models: ServedModel, limits: Limits | None = None) -> Engine:
    return Engine(
        list(models) or [fake_served_model()],
        limits=limits or Limits(16, request_timeout_s=30, image=ImageLimits(max_pixels=1_000_000)),
        decode_workers=2,
    )


def prepared_on_cpu(served: ServedModel, data: bytes, limits: ImageLimits) -> torch.Tensor:
    """`served.prepare` for a model that decodes on the CPU: the (3, crop, crop) tensor its batch gets."""
    pixels = served.prepare(data, limits)
    assert isinstance(pixels, torch.Tensor), "decoded on the device"
    return pixels


def served_model_of(client: httpx.AsyncClient, name: str | None = None) -> ServedModel:
    """The served model behind an in-process test client."""
    engine: Engine = client._transport.app.state.engine  # type: ignore[attr-defined]
    return engine.model(name)


def image_bytes(color: tuple[int, int, int], *, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def distinct_colors(n: int) -> list[tuple[int, int, int]]:
    return [((37 * i) % 256, (91 * i + 40) % 256, (173 * i + 80) % 256) for i in range(n)]


def reference_logits(model: torch.nn.Module, data: bytes, params: PreprocessParams) -> np.ndarray:
    """torchvision directly: model(preset(ImageOps.exif_transpose(img).convert("RGB")))."""
    preset = build_preprocessor(params)
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    with torch.inference_mode():
        logits: torch.Tensor = model(preset(image)[None])
        return logits[0].numpy()


def tiny_hf_vit(
    *, image_size: int = 32, patch_size: int = 8, labels: Sequence[str] = (), num_labels: int = 10, **config: Any
) -> transformers.ViTForImageClassification:
    """A small random Hugging Face `ViTForImageClassification` in eval mode (`labels`, when given, name its classes;
    `config`: further `ViTConfig` arguments, e.g. `attn_implementation`). Seeded: the same call, the same weights."""
    import transformers  # the hf extra: only the tests of that source pay for its import

    torch.manual_seed(0)
    if labels:
        config |= {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}
    else:
        config["num_labels"] = num_labels
    vit_config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **config,
    )
    model = transformers.ViTForImageClassification(vit_config)
    model.eval()  # type: ignore[no-untyped-call]  # transformers leaves its `eval` override unannotated
    return model


def tiny_vit(*, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> VisionTransformer:
    """A real torchvision ViT, small enough for a CPU test, with a random (not zero) head."""
    torch.manual_seed(seed)
    model = VisionTransformer(
        image_size=image_size,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=num_classes,
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: all logits 0
    return model.eval()


def steered_vit(spike: tuple[int, int] | None) -> VisionTransformer:
    """A 4x4-patch ViT whose tokens are its positional embeddings alone, unchanged from layer to layer.

    With a spike, patch (row, col) carries a large feature 0 and every other token is zero; every key reads feature 0
    and every query is a large constant, so every token attends to that patch. Without, queries and keys are zero, so
    attention is uniform.
    """
    torch.manual_seed(0)
    hidden = 16
    vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=hidden, mlp_dim=32, num_classes=10).eval()
    with torch.no_grad():
        for tensor in (vit.conv_proj.weight, vit.conv_proj.bias, vit.class_token, vit.encoder.pos_embedding):
            tensor.zero_()
        if spike is not None:
            vit.encoder.pos_embedding[0, 1 + spike[0] * 4 + spike[1], 0] = 5.0
        for block in vit.encoder.layers:
            attention = block.self_attention
            attention.in_proj_weight[: 2 * hidden].zero_()  # rows [0, E) are the query's, [E, 2E) the key's
            attention.in_proj_bias[: 2 * hidden].zero_()
            if spike is not None:
                attention.in_proj_weight[hidden : 2 * hidden, 0] = 1.0
                attention.in_proj_bias[:hidden] = 10.0
            for tensor in (attention.out_proj.weight, attention.out_proj.bias, block.mlp[3].weight, block.mlp[3].bias):
                tensor.zero_()  # the residual stream is never written to
    return vit


def write_model_folder(
    repository: Path,
    name: str,
    model: VisionTransformer,
    *,
    labels: list[str] | None = None,
    extra: str = "",
    weights_file: str = "weights.pth",
) -> Path:
    """Save `model` as a state_dict in `repository/name/` with a model.toml describing it."""
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    if weights_file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(folder / weights_file))
    else:
        torch.save(model.state_dict(), folder / weights_file)
    labels = labels or [f"label {i}" for i in range(model.num_classes)]
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "model.toml").write_text(
        f'arch = "vit"\nweights = "{weights_file}"\nlabels = "labels.txt"\n{extra}\n'
        "[arch_params]\n"
        f"image_size = {model.image_size}\npatch_size = {model.patch_size}\nnum_layers = {len(model.encoder.layers)}\n"
        f"num_heads = {model.encoder.layers[0].num_heads}\nhidden_dim = {model.hidden_dim}\n"
        f"mlp_dim = {model.mlp_dim}\n"
    )
    return folder
