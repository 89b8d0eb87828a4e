"""Embeddings: `/v1/embed` and OIP's EMBEDDING output give the encoder's class-token output, from the same batches and
the same forward as classification, for torchvision, Hugging Face and timm ViTs."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from app.config.settings import Settings
from app.engine.facade import Engine
from app.pipeline.image_scan import ImageLimits
from app.pipeline.preprocess import Preprocessor, PreprocessParams, build_preprocessor
from app.sources.hf_models import HuggingFaceSource, LogitsOf
from app.sources.timm_models import TimmSource
from app.sources.torchvision_models import TorchvisionSource
from tests.support.fakes import fake_engine, reference_logits, tiny_hf_vit, tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.photos import photo_jpegs

SIZE = 32


def chelsea() -> bytes:
    return photo_jpegs()["chelsea"]


def encoder_output(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's own modules, step by step: the class token after the encoder."""
    tokens = model._process_input(pixels)  # type: ignore[operator]
    class_token = model.class_token.expand(tokens.shape[0], -1, -1)  # type: ignore[operator]
    with torch.inference_mode():
        return model.encoder(torch.cat([class_token, tokens], dim=1))[:, 0]  # type: ignore[operator, no-any-return]


def preprocessed(data: bytes) -> torch.Tensor:
    from app.pipeline.decode import decode

    preset: Preprocessor = build_preprocessor(PreprocessParams.for_image_size(SIZE))
    return preset(decode(data, limits=ImageLimits(max_pixels=10**8)))


@pytest.fixture
def repository(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = tiny_vit(image_size=SIZE)
    write_model_folder(tmp_path, "tiny", model)
    return tmp_path, model


async def test_embeddings_are_the_encoders_class_token_and_logits_come_from_the_same_forward(
    repository: tuple[Path, nn.Module],
) -> None:
    root, model = repository
    # A window far longer than the test: only a full batch (both requests' 6 images) can answer them in time.
    settings = Settings(model_repository=root, model=["tiny"], max_batch_size=6, max_queue_delay_ms=600_000)
    engine = Engine.load(settings)
    images = dict(list(photo_jpegs().items())[:3])
    served = engine.model()
    async with serve_in_process(engine, settings) as client:
        files = [("image", (name, body, "application/octet-stream")) for name, body in images.items()]
        forwards = 0

        def count(*_: object) -> None:
            nonlocal forwards
            forwards += 1

        hook = served._module.features.vit.encoder.register_forward_hook(count)  # type: ignore[union-attr]
        try:
            async with asyncio.timeout(20):
                embedded, classified = await asyncio.gather(
                    client.post("/v1/embed", files=files), client.post("/v1/classify", files=files)
                )
        finally:
            hook.remove()
    assert embedded.status_code == 200, embedded.text
    body = embedded.json()
    assert body["model"] == "tiny" and body["dim"] == 32 and body["normalized"] is False
    vectors = np.array(body["embeddings"], dtype=np.float32)
    expected = encoder_output(model, torch.stack([preprocessed(b) for b in images.values()])).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    assert len({tuple(np.round(v, 4)) for v in vectors}) == len(images)  # each image its own embedding
    # Both requests (6 images) went through one batch: one encoder forward for logits and embeddings together.
    assert (forwards, served.batcher.stats.batch_sizes[-1]) == (1, 2 * len(images)), served.batcher.stats
    params = PreprocessParams.for_image_size(SIZE)
    for prediction, data in zip(classified.json()["predictions"], images.values(), strict=True):
        np.testing.assert_allclose(prediction["logits"], reference_logits(model, data, params), atol=1e-3)


async def test_normalized_and_base64_embeddings(repository: tuple[Path, nn.Module]) -> None:
    root, _ = repository
    settings = Settings(model_repository=root, model=["tiny"])
    image = chelsea()
    async with serve_in_process(Engine.load(settings), settings) as client:
        plain = await client.post("/v1/models/tiny/embed", content=image, headers={"Content-Type": "image/jpeg"})
        unit = await client.post(
            "/v1/embed", content=image, headers={"Content-Type": "image/jpeg"}, params={"normalize": "true"}
        )
        packed = await client.post(
            "/v1/embed",
            json={
                "images": [base64.b64encode(image).decode()],
                "normalize": True,
                "encoding_format": "base64",
            },
        )
        bad = await client.post("/v1/embed", content=image, params={"encoding_format": "hex"})
        unknown = await client.post("/v1/embed", content=image, params={"top_k": 3})
        still = await client.post("/v1/embed", content=image)
    vector = np.array(plain.json()["embeddings"][0], dtype=np.float32)
    normalized = np.array(unit.json()["embeddings"][0], dtype=np.float32)
    assert unit.json()["normalized"] is True
    np.testing.assert_allclose(normalized, vector / np.linalg.norm(vector), atol=1e-6)
    assert np.linalg.norm(normalized) == pytest.approx(1.0, abs=1e-6)
    decoded = np.frombuffer(base64.b64decode(packed.json()["embeddings"][0]), dtype="<f4")
    assert packed.json()["encoding_format"] == "base64"
    np.testing.assert_array_equal(decoded, normalized)
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid_parameter")
    assert unknown.status_code == 422 and "unknown query parameter 'top_k'" in unknown.json()["error"]
    assert still.status_code == 200


async def test_a_model_without_a_known_head_answers_422_and_still_classifies() -> None:
    async with serve_in_process(fake_engine()) as client:
        response = await client.post("/v1/embed", content=chelsea())
        classified = await client.post("/v1/classify", content=chelsea())
    assert (response.status_code, response.json()["code"]) == (422, "embedding_unsupported")
    assert classified.status_code == 200


async def test_oip_embedding_output_equals_the_v1_embedding(repository: tuple[Path, nn.Module]) -> None:
    root, _ = repository
    settings = Settings(model_repository=root, model=["tiny"])
    images = list(photo_jpegs().values())[:3]
    async with serve_in_process(Engine.load(settings), settings) as client:
        meta = (await client.get("/v2/models/tiny")).json()
        config = (await client.get("/v2/models/tiny/config")).json()
        spec = {"name": "IMAGE", "shape": [len(images), 1], "datatype": "BYTES"}
        inputs = [{**spec, "data": [base64.b64encode(i).decode() for i in images], "parameters": {}}]
        inputs[0]["parameters"] = {"content_type": "base64"}
        asked = await client.post("/v2/models/tiny/infer", json={"inputs": inputs, "outputs": [{"name": "EMBEDDING"}]})
        everything = await client.post("/v2/models/tiny/infer", json={"inputs": inputs})
        files = [("image", (f"{i}.jpg", body, "image/jpeg")) for i, body in enumerate(images)]
        v1 = await client.post("/v1/embed", files=files)
    assert meta["outputs"] == [
        {"name": "LOGITS", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 32]},
    ]
    assert [o["name"] for o in config["output"]] == ["LOGITS", "EMBEDDING"]
    assert asked.status_code == 200, asked.text
    (output,) = asked.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("EMBEDDING", "FP32", [len(images), 32])
    expected = np.array(v1.json()["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(np.array(output["data"]).reshape(len(images), 32), expected, atol=1e-6)
    assert [o["name"] for o in everything.json()["outputs"]] == ["LOGITS", "EMBEDDING"]  # none named: all


def test_hf_and_timm_embeddings_are_what_their_libraries_give() -> None:
    hf = tiny_hf_vit(image_size=SIZE, num_labels=7)
    pixels = torch.randn(3, 3, SIZE, SIZE)
    wrapped = HuggingFaceSource().split_head(LogitsOf(hf), SIZE)
    assert wrapped is not None and wrapped.dim == 32
    with torch.inference_mode():
        out = wrapped(pixels)
        expected = hf(pixel_values=pixels, output_hidden_states=False)
        hidden = hf.vit(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(out[:, :7], expected.logits)
    torch.testing.assert_close(out[:, 7:], hidden)

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=SIZE, patch_size=8)
    assert isinstance(model, timm.models.VisionTransformer)
    model.eval()
    wrapped = TimmSource().split_head(model, SIZE)
    assert wrapped is not None and wrapped.dim == model.num_features
    with torch.inference_mode():
        out = wrapped(pixels)
        features = model.forward_head(model.forward_features(pixels), pre_logits=True)
        logits = model(pixels)
    torch.testing.assert_close(out[:, :5], logits)
    torch.testing.assert_close(out[:, 5:], features)


def test_a_module_whose_head_is_unknown_is_served_without_embeddings() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 4))
    for source in (TorchvisionSource(), HuggingFaceSource(), TimmSource()):
        assert source.split_head(module, SIZE) is None
