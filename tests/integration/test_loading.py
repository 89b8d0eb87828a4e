"""Model folders -> served models: real tiny ViTs saved to disk, their logits against torchvision's, bad configs."""

from __future__ import annotations

import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from app.config.model_config import load_model_config
from app.config.settings import Settings
from app.engine.facade import Engine
from app.errors import ModelLoadError
from app.pipeline.preprocess import PreprocessParams
from app.sources.registry import load_model
from tests.support.fakes import reference_logits, tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process

CPU = torch.device("cpu")


def jpeg(array: np.ndarray, *, exif_orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    image.save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def photos() -> dict[str, bytes]:
    """Real photographs shipped with scikit-image, one of them with an EXIF rotation."""
    return {
        "chelsea.jpg": jpeg(skdata.chelsea()),
        "astronaut-rotated.jpg": jpeg(skdata.astronaut()[:, 64:], exif_orientation=6),
        "coffee.png": _png(skdata.coffee()),
    }


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("weights_file", ["weights.pth", "weights.safetensors"])
async def test_served_logits_equal_torchvision_on_real_photographs(tmp_path: Path, weights_file: str) -> None:
    model = tiny_vit(image_size=64, num_classes=10)
    labels = [f"thing {i}" for i in range(10)]
    write_model_folder(tmp_path, "tiny", model, labels=labels, weights_file=weights_file)
    settings = Settings(model_repository=tmp_path, model=["tiny"], max_batch_size=4, max_queue_delay_ms=20)
    engine = Engine.load(settings)
    images = photos()
    async with serve_in_process(engine, settings) as client:
        files = [("image", (name, body, "application/octet-stream")) for name, body in images.items()]
        response = await client.post("/v1/classify", files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    params = PreprocessParams.for_image_size(64)
    for prediction, body in zip(predictions, images.values(), strict=True):
        expected = reference_logits(model, body, params)
        np.testing.assert_allclose(prediction["logits"], expected, atol=1e-3, rtol=0)
        best = int(np.argmax(expected))
        assert prediction["top_k"][0] == pytest.approx(
            {"index": best, "label": labels[best], "score": float(torch.softmax(torch.tensor(expected), 0)[best])}
        )
    assert len({tuple(np.round(p["logits"], 4)) for p in predictions}) == 3  # three images, three answers


def test_model_info_describes_what_is_served(tmp_path: Path) -> None:
    model = tiny_vit(image_size=32, num_classes=5)
    write_model_folder(tmp_path, "tiny", model, extra="[batching]\nmax_batch_size = 3\n[preprocess]\nresize_size = 40")
    engine = Engine.load(Settings(model_repository=tmp_path, model=["tiny"]))
    info = engine.describe()
    assert info.arch == "vit" and info.num_classes == 5 and info.input_size == [3, 32, 32]
    assert info.num_params == sum(p.numel() for p in model.parameters())
    assert info.weights == str((tmp_path / "tiny" / "weights.pth").resolve())
    assert (info.device, info.dtype) == ("cpu", "fp32")
    assert info.batching.model_dump() == {
        "max_batch_size": 3,
        "max_queue_delay_ms": 5.0,
        "max_queue_size": 256,
        "max_queue_bytes": 64 * 2**20,
    }
    assert info.preprocess["resize_size"] == 40 and info.preprocess["crop_size"] == 32


def test_weights_override_takes_a_file_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit(seed=1))
    other = tiny_vit(seed=2)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    monkeypatch.chdir(tmp_path)
    config = load_model_config(tmp_path, "tiny", weights_override="other.pth")
    loaded = load_model(config, device=CPU, dtype=torch.float32)
    assert torch.equal(loaded.module.get_parameter("heads.head.weight"), other.heads.head.weight)
    random = load_model(load_model_config(tmp_path, "tiny", weights_override="random"), device=CPU, dtype=torch.float32)
    assert random.weights_source == "random"


def test_a_training_checkpoint_with_a_ddp_prefix_loads(tmp_path: Path) -> None:
    model = tiny_vit()
    write_model_folder(tmp_path, "tiny", model)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "tiny" / "weights.pth")
    loaded = load_model(load_model_config(tmp_path, "tiny"), device=CPU, dtype=torch.float32)
    assert torch.equal(loaded.module.get_parameter("heads.head.weight"), model.heads.head.weight)


def test_bf16_serves_close_to_fp32(tmp_path: Path) -> None:
    model = tiny_vit(image_size=32)
    write_model_folder(tmp_path, "tiny", model)
    config = load_model_config(tmp_path, "tiny")
    fp32 = load_model(config, device=CPU, dtype=torch.float32).module
    bf16 = load_model(config, device=CPU, dtype=torch.bfloat16).module
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference, low = fp32(x), bf16(x.to(torch.bfloat16)).float()
    assert low.argmax(1).tolist() == reference.argmax(1).tolist()
    assert torch.allclose(low, reference, atol=0.1 * reference.abs().max().item())


# -- start-up failures: one clear line that says what to do ---------------------------------------------------


def _write(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(text)


BAD_CONFIGS = [
    pytest.param('arch = "vit_b_16"\nweights = "random"\nlabels = "imagenet"\nwieghts = 1\n', "unknown key 'wieghts'"),
    pytest.param('weights = "random"\nlabels = "imagenet"\n', "missing key 'arch'"),
    pytest.param('arch = "resnet50"\nweights = "random"\nlabels = "imagenet"\n', "unknown arch 'resnet50'"),
    pytest.param('arch = "vit"\nweights = "random"\nlabels = "imagenet"\n', "needs an [arch_params] table"),
    pytest.param('arch = "vit_b_16"\nweights = "IMAGENET1K_V9"\nlabels = "imagenet"\n', "IMAGENET1K_V1"),
    pytest.param('arch = "vit_b_16"\nweights = "missing.pth"\nlabels = "imagenet"\n', "not found; set weights"),
    pytest.param('arch = "vit_b_16"\nweights = "random"\nlabels = "nope.txt"\n', "cannot read labels file"),
    pytest.param('arch = "vit_b_16"\nweights = "random"\n', "set labels"),
    pytest.param('arch = "vit_b_16" weights', "cannot read"),
    pytest.param(
        'arch = "vit_b_16"\nweights = "random"\nlabels = "imagenet"\nnum_classes = 10\n', "num_classes = 10 but"
    ),
    pytest.param(
        'arch = "vit_b_16"\nweights = "random"\nlabels = "imagenet"\n[batching]\nmax_batch_size = 0\n',
        "batching.max_batch_size",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_a_bad_config_stops_start_up_with_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path / "m", text)
    with pytest.raises(ModelLoadError) as caught:
        load_model(load_model_config(tmp_path, "m"), device=CPU, dtype=torch.float32)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unknown_model_lists_the_repository(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit())
    with pytest.raises(ModelLoadError, match=r"no .*model\.toml \(models in .*: tiny\)"):
        load_model_config(tmp_path, "other")


def test_weights_that_do_not_fit_name_the_problem(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit(num_classes=10))
    torch.save(tiny_vit(num_classes=7).state_dict(), tmp_path / "tiny" / "weights.pth")
    with pytest.raises(ModelLoadError, match=r"shape mismatches, e\.g\. heads\.head\.weight: file \(7, 32\)"):
        load_model(load_model_config(tmp_path, "tiny"), device=CPU, dtype=torch.float32)
    (tmp_path / "tiny" / "weights.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(load_model_config(tmp_path, "tiny"), device=CPU, dtype=torch.float32)


def test_a_crop_that_does_not_match_the_model_input_is_refused(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=32), extra="[preprocess]\ncrop_size = 224")
    with pytest.raises(ModelLoadError, match="crop_size = 224 but the model takes 32x32"):
        load_model(load_model_config(tmp_path, "tiny"), device=CPU, dtype=torch.float32)


def test_pretrained_weights_go_through_torchvision_and_fail_clearly_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network in tests: the download is replaced by the error this machine's resolver gives."""
    calls: list[tuple[str, str | None]] = []

    def offline(url: str, model_dir: str | None = None, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append((url, model_dir))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    _write(tmp_path / "b32", 'arch = "vit_b_32"\nweights = "IMAGENET1K_V1"\nlabels = "imagenet"\n')
    config = load_model_config(tmp_path, "b32")
    with pytest.raises(ModelLoadError) as caught:
        load_model(config, device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "cannot download pretrained weights vit_b_32.IMAGENET1K_V1" in message
    assert "Name or service not known" in message and "`random` for a smoke test" in message
    assert calls == [("https://download.pytorch.org/models/vit_b_32-d86f8d99.pth", str(tmp_path / "cache"))]


def test_repository_configs_of_the_torchvision_family_are_valid() -> None:
    """The shipped models/ folders parse, and name weights torchvision knows, with their presets."""
    from torchvision.models import get_model_weights

    repository = Path(__file__).resolve().parents[2] / "models"
    names = sorted(p.name for p in repository.iterdir() if (p / "model.toml").exists())
    assert names == ["vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"]
    for name in names:
        config = load_model_config(repository, name)
        assert config.arch == name
        assert config.weights in get_model_weights(name).__members__


@pytest.mark.slow
async def test_a_full_size_torchvision_vit_builds_and_serves_with_random_weights(tmp_path: Path) -> None:
    _write(tmp_path / "b32", 'arch = "vit_b_32"\nweights = "random"\nlabels = "imagenet"\n')
    settings = Settings(model_repository=tmp_path, model=["b32"], max_batch_size=1)
    engine = Engine.load(settings)
    async with engine:
        result = await engine.classify([jpeg(skdata.chelsea())], top_k=5)
    assert engine.model().info().num_params == 88_224_232
    assert len(result.predictions[0].top_k) == 5
    assert result.predictions[0].logits is not None and result.predictions[0].logits.shape == (1000,)


def test_random_weights_are_the_same_on_every_start_and_not_degenerate(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=32))
    config = load_model_config(tmp_path, "tiny", weights_override="random")
    first, second = (load_model(config, device=CPU, dtype=torch.float32).module for _ in range(2))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = first(x), second(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # a zero head would give every image the same (zero) logits
