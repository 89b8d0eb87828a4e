"""Models from Hugging Face Transformers folders and timm, served through the same engine and endpoints: logits equal
to each library's own pipeline on real photographs, labels from the checkpoint, clear errors when something is missing.
Checkpoints are small random models built here, offline."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image
from skimage import data as skdata
from timm.data.config import resolve_data_config
from timm.data.transforms_factory import create_transform

from app.config.settings import Settings
from app.engine.facade import Engine
from app.errors import ModelLoadError
from tests.support.fakes import tiny_hf_vit
from tests.support.inprocess import serve_in_process

LABELS = ["ant", "bee", "cat", "dog", "eel"]


def photos() -> list[bytes]:
    result = []
    for array in (skdata.chelsea(), skdata.astronaut(), skdata.coffee()):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        result.append(buffer.getvalue())
    return result


def hf_folder(root: Path, name: str, processor: object) -> transformers.ViTForImageClassification:
    """A small random ViT in Hugging Face layout (`save_pretrained`), with its image processor."""
    model = tiny_hf_vit(image_size=64, patch_size=16, labels=LABELS)
    torch.nn.init.normal_(model.get_parameter("classifier.weight"), std=1.0)  # spread the logits out
    folder = root / name
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # type: ignore[attr-defined]
    (folder / "model.toml").write_text('arch = "hf"\n')
    return model


async def served_logits(root: Path, name: str) -> tuple[list[list[float]], list[str]]:
    engine = Engine.load(Settings(model_repository=root, model=[name], max_batch_size=4))
    async with serve_in_process(engine) as client:
        files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos())]
        response = await client.post("/v1/classify", files=files, params={"top_k": 1})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert (await client.get(f"/v2/models/{name}")).status_code == 200  # and over the OIP
    return [p["logits"] for p in predictions], [p["top_k"][0]["label"] for p in predictions]


@pytest.mark.parametrize(
    "processor",
    [
        transformers.ViTImageProcessor(size={"height": 64, "width": 64}),
        transformers.DeiTImageProcessor(size={"height": 72, "width": 72}, crop_size={"height": 64, "width": 64}),
    ],
    ids=["vit-processor", "deit-processor-with-crop"],
)
async def test_a_hugging_face_folder_serves_what_its_own_pipeline_computes(tmp_path: Path, processor: object) -> None:
    model = hf_folder(tmp_path, "hfvit", processor)
    logits, labels = await served_logits(tmp_path, "hfvit")
    for data, served in zip(photos(), logits, strict=True):
        pixels = processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"]  # type: ignore[operator]
        with torch.inference_mode():
            expected = model(pixel_values=pixels).logits[0].numpy()
        np.testing.assert_allclose(served, expected, atol=1e-3)
    assert set(labels) <= set(LABELS)  # labels from config.json's id2label
    assert labels == [LABELS[int(np.argmax(row))] for row in logits]


async def test_a_timm_model_serves_what_timm_computes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(LABELS)).eval()
    torch.nn.init.normal_(model.get_parameter("head.weight"), std=1.0)
    folder = tmp_path / "tiny_timm"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "weights.pth")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "model.toml").write_text(
        'arch = "timm:vit_tiny_patch16_224"\nweights = "weights.pth"\nlabels = "labels.txt"\n'
    )
    logits, labels = await served_logits(tmp_path, "tiny_timm")
    data_config = resolve_data_config({}, model=model)  # type: ignore[no-untyped-call]  # timm leaves it unannotated
    transform = create_transform(**data_config)
    for data, served in zip(photos(), logits, strict=True):
        with torch.inference_mode():
            expected = model(transform(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0].numpy()
        np.testing.assert_allclose(served, expected, atol=1e-3)
    assert labels == [LABELS[int(np.argmax(row))] for row in logits]


def test_a_timm_model_with_random_weights_is_seeded(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "model.toml").write_text('arch = "timm:vit_tiny_patch16_224"\nweights = "random"\nnum_classes = 3\n')
    first, second = (Engine.load(Settings(model_repository=tmp_path, model=["r"])).model() for _ in range(2))
    assert first.info().weights == "timm:vit_tiny_patch16_224:random"
    a, b = (dict(m._loaded.module.named_parameters())["head.weight"] for m in (first, second))
    assert torch.equal(a, b) and a.std() > 0.1  # the same draw every time, and not timm's tiny init


def test_a_missing_extra_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "model.toml").write_text('arch = "timm:vit_tiny_patch16_224"\nweights = "random"\nnum_classes = 3\n')
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"needs timm, which is not installed: pip install 'vit-serve\[timm\]'"):
        Engine.load(Settings(model_repository=tmp_path, model=["t"]))


def test_a_hugging_face_folder_missing_a_file_is_named(tmp_path: Path) -> None:
    hf_folder(tmp_path, "h", transformers.ViTImageProcessor(size={"height": 64, "width": 64}))
    (tmp_path / "h" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"is not a Hugging Face model folder: no preprocessor_config.json"):
        Engine.load(Settings(model_repository=tmp_path, model=["h"]))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('arch = "timm:no_such_model"\nweights = "random"\nnum_classes = 3\n', "timm has no model 'no_such_model'"),
        ('arch = "hf"\n[preprocess]\ncrop_size = 224\n', "bring their own architecture and preprocessing"),
        ('arch = "timm:"\nweights = "random"\n', "unknown arch 'timm:'"),
    ],
)
def test_bad_model_sources_fail_at_start_with_one_clear_line(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.toml").write_text(toml)
    with pytest.raises(ModelLoadError, match=message):
        Engine.load(Settings(model_repository=tmp_path, model=["m"]))
