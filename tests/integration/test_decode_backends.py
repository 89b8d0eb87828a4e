"""decode_backend on the CPU: the setting and its `auto`, the start-up error without nvImageCodec, the decoder
interface's per-image CPU fallback (a lane and the API), and nvImageCodec's adapter against a stand-in module.

nvImageCodec on a GPU (the hardware decoder, pixels against PIL, the service end to end) is in tests/gpu/test_gpu.py."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.config.settings import Settings
from app.engine.facade import Engine
from app.errors import ModelLoadError
from app.pipeline.gpu_decode import EncodedJpeg, decode_jpegs, probe_jpeg
from app.pipeline.jpeg_decoders import NVIMAGECODEC_MODULE, DecodeBackend, NvImageCodecDecoder, decode_backend
from app.runtime.lanes import Lane
from app.runtime.runner import EagerForward
from tests.support.fakes import tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.lanes import preset_lane, preset_pixels
from tests.support.photos import photo_jpegs

CPU = torch.device("cpu")


@pytest.fixture
def without_nvimagecodec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, NVIMAGECODEC_MODULE, None)  # importing it raises ImportError


@pytest.fixture
def with_nvimagecodec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, NVIMAGECODEC_MODULE, types.ModuleType(NVIMAGECODEC_MODULE))


def test_the_setting_defaults_to_auto_reads_the_environment_and_refuses_other_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().decode_backend == "auto"
    monkeypatch.setenv("VIT_DECODE_BACKEND", "nvimagecodec")
    assert Settings().acceleration().decode_backend == "nvimagecodec"
    with pytest.raises(ValidationError, match="decode_backend"):
        Settings(decode_backend="nvjpeg")


@pytest.mark.usefixtures("with_nvimagecodec")
def test_auto_takes_nvimagecodec_when_installed_and_jpegs_go_to_the_gpu() -> None:
    assert decode_backend("auto", on_device=True).name == "nvimagecodec"
    assert decode_backend("auto", on_device=False).name == "torchvision"
    assert decode_backend("torchvision", on_device=True).name == "torchvision"


@pytest.mark.usefixtures("without_nvimagecodec")
def test_without_nvimagecodec_auto_takes_torchvision_and_asking_for_it_says_what_to_install(tmp_path: Path) -> None:
    assert decode_backend("auto", on_device=True).name == "torchvision"
    write_model_folder(tmp_path, "tiny", tiny_vit())
    with pytest.raises(ModelLoadError, match=r"pip install 'vit-serve\[nvimagecodec\]'"):
        Engine.load(Settings(model_repository=tmp_path, model=["tiny"], device="cpu", decode_backend="nvimagecodec"))


class RefusingDecoder:
    """torchvision's decoder on the CPU, but None for the images whose bytes are in `refused`; records its batches."""

    def __init__(self, refused: set[bytes]) -> None:
        self.refused = refused
        self.batches: list[int] = []

    def decode(self, images: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
        self.batches.append(len(images))
        decoded = decode_jpegs(images, device)
        return [None if image.encoded in self.refused else one for image, one in zip(images, decoded, strict=True)]


def refusing(decoder: RefusingDecoder) -> DecodeBackend:
    return DecodeBackend("nvimagecodec", lambda device: decoder)


def test_an_image_the_decoder_refuses_is_decoded_on_the_cpu_alone_and_the_batch_is_served() -> None:
    photos = list(photo_jpegs().values())[:4]
    decoder = RefusingDecoder({photos[1]})
    on_cpu: list[bytes] = []

    def decode_on_cpu(data: bytes) -> torch.Tensor:
        on_cpu.append(data)
        return preset_pixels(data)

    model = tiny_vit(image_size=224, num_classes=1000)
    lane = preset_lane(EagerForward(model), device=CPU, dtype=torch.float32, max_batch=4, per_forward=4)
    spec = dataclasses.replace(lane.spec, decode_backend=refusing(decoder), decode_on_cpu=decode_on_cpu)
    lane = Lane(spec, lane.forward)
    encoded = [probe_jpeg(p, max_pixels=10**9) for p in photos]
    assert all(e is not None for e in encoded)
    outputs = lane.run([e for e in encoded if e is not None])
    assert decoder.batches == [4] and on_cpu == [photos[1]]
    with torch.inference_mode():
        expected = model(torch.stack([preset_pixels(p) for p in photos])).numpy()
    logits = np.array([o.logits for o in outputs])  # type: ignore[union-attr]
    np.testing.assert_allclose(logits[1], expected[1], rtol=1e-5, atol=1e-5)  # the refused one: the CPU path's
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 0.01


async def test_the_api_serves_a_batch_with_a_refused_image_and_names_the_backend(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=224, num_classes=1000))
    settings = Settings(model_repository=tmp_path, model=["tiny"], max_batch_size=4, drain_timeout_s=5)
    photos = list(photo_jpegs().values())[:3]
    results = {}
    for on_device in (False, True):
        engine = Engine.load(settings)
        decoder = RefusingDecoder({photos[2]})
        engine.model().decode_on_device = on_device
        engine.model().decode_backend = refusing(decoder)
        async with serve_in_process(engine, settings) as client:
            files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
            response = await client.post("/v1/classify", files=files)
            assert response.status_code == 200
            results[on_device] = np.array([p["logits"] for p in response.json()["predictions"]])
            info = (await client.get("/v1/models/tiny")).json()["acceleration"]
            assert info["decode_backend"] == ("nvimagecodec" if on_device else None)
        assert bool(decoder.batches) == on_device  # the decoder saw the batches only when JPEGs went to the device
    device, cpu = results[True], results[False]
    assert (np.abs(device - cpu).max(axis=1) / np.abs(cpu).max(axis=1)).max() < 0.01
    assert device.argmax(axis=1).tolist() == cpu.argmax(axis=1).tolist()


class StandInCodec:
    """What NvImageCodecDecoder uses of nvidia.nvimgcodec, decoding with numpy on the CPU: (h, w, 3) arrays."""

    class BackendKind:
        HW_GPU_ONLY, GPU_ONLY, HYBRID_CPU_GPU = "hw", "gpu", "hybrid"

    class ColorSpec:
        SRGB = "srgb"

    class SampleFormat:
        I_RGB = "i_rgb"

    def __init__(self, fail_batch: bool) -> None:
        self.fail_batch = fail_batch
        self.backends: list[Any] = []
        self.calls: list[int] = []
        codec = self

        class Decoder:
            def __init__(self, device_id: int, max_num_cpu_threads: int, backends: list[Any]) -> None:
                codec.backends = backends

            def decode(self, src: Any, *, params: Any, cuda_stream: int) -> Any:
                if isinstance(src, list):
                    codec.calls.append(len(src))
                    if codec.fail_batch:
                        raise RuntimeError("batch refused")
                    return [codec.pixels(one) for one in src]
                codec.calls.append(1)
                if src == b"bad":
                    raise RuntimeError("refused")
                return codec.pixels(src)

        self.Decoder = Decoder
        self.Backend = lambda kind: kind
        self.DecodeParams = lambda **params: params
        self.CodeStream = self.code_stream

    def code_stream(self, data: bytes) -> bytes:
        if data == b"garbage":
            raise RuntimeError("not an image")
        return data

    def pixels(self, data: bytes) -> np.ndarray[Any, Any] | None:
        if data == b"none":
            return None
        return np.full((2, 5, 3), len(data), dtype=np.uint8)  # (h, w, 3)


def jpeg_of(data: bytes) -> EncodedJpeg:
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), data, 5, 2)


@pytest.mark.parametrize("fail_batch", [False, True])
def test_nvimagecodec_decodes_a_batch_in_one_call_hardware_first_and_gives_chw_or_none(fail_batch: bool) -> None:
    codec = StandInCodec(fail_batch)
    decoder = NvImageCodecDecoder(codec, CPU)
    assert codec.backends == ["hw", "gpu", "hybrid"]
    third = jpeg_of(b"bad") if fail_batch else jpeg_of(b"three")
    decoded = decoder.decode([jpeg_of(b"one"), jpeg_of(b"garbage"), jpeg_of(b"none"), third], CPU)
    assert codec.calls == ([3, 1, 1, 1] if fail_batch else [3])  # what parses, as one batch; refused: each alone
    assert decoded[1] is None and decoded[2] is None and (decoded[3] is None) == fail_batch
    assert decoded[0] is not None and decoded[0].shape == (3, 2, 5) and int(decoded[0][0, 0, 0]) == 3
