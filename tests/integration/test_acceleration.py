"""The fast paths, checked on the CPU: batch buckets, compiled forwards, fp16/bf16 against fp32, the device decode
path (torchvision's decoder and the preset on tensors) against PIL, lanes, the memory bound, batches in flight.

The CUDA-only parts (graphs, pinned buffers, streams, nvJPEG) are in test_gpu.py, skipped without a GPU."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from app.config.settings import BatchingConfig, Settings
from app.engine.batcher import Batcher
from app.engine.facade import Engine
from app.errors import InvalidImage, ModelLoadError
from app.pipeline.gpu_decode import EncodedJpeg, decode_jpegs, preprocess_decoded, probe_jpeg
from app.runtime.lanes import Lane
from app.runtime.memory import images_per_forward
from app.runtime.runner import BucketedForward, EagerForward, Forward, batch_buckets, bucket_for, compile_module
from tests.support.fakes import CPU_ACCELERATION, FakeViT, fake_engine, fake_served_model, tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.lanes import PRESET, preset_lane, preset_pixels
from tests.support.photos import jpeg, photo, photo_jpegs

CPU = torch.device("cpu")
cpu_pixels = preset_pixels


def device_pixels(data: bytes) -> torch.Tensor:
    encoded = probe_jpeg(data, max_pixels=10**9)
    assert encoded is not None
    decoded = decode_jpegs([encoded], CPU)
    assert decoded[0] is not None
    return preprocess_decoded([decoded[0]], PRESET)[0]


# -- buckets and forwards ------------------------------------------------------------------------------------------


def test_buckets_are_powers_of_two_up_to_the_largest_batch_and_it() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]
    assert batch_buckets(24, [4, 12, 64]) == [4, 12, 24]  # configured ones past the largest batch are dropped
    assert [bucket_for(n, [1, 2, 4, 8]) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="over the largest bucket"):
        bucket_for(9, [1, 2, 4, 8])


def test_batch_buckets_setting_parses_sorts_and_refuses_nonsense() -> None:
    assert Settings(batch_buckets="16, 1,4,4").batch_buckets == [1, 4, 16]
    with pytest.raises(ValidationError):
        Settings(batch_buckets="0,4")
    with pytest.raises(ValidationError):
        Settings(batch_memory_fraction=0)


def test_a_bucketed_compiled_forward_pads_and_answers_each_size_as_the_module_does() -> None:
    model = tiny_vit()
    compiled = compile_module(model, backend="eager")  # torch.compile's tracing, without a C++ toolchain's wait
    forward = BucketedForward(compiled, batch_buckets(8))
    images = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        forward.warm_up(images)
        expected = model(images)
        for size in range(1, 9):  # 3 is padded to 4, 5 to 8, ...
            torch.testing.assert_close(forward(images[:size]), expected[:size], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_every_bucket_in_the_warm_up_and_never_while_serving() -> None:
    torch._dynamo.reset()
    model = tiny_vit()
    compiled = compile_module(model)  # inductor: C++ kernels on the CPU
    forward = BucketedForward(compiled, batch_buckets(4))
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        forward.warm_up(images)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for size in (1, 2, 3, 4):
            torch.testing.assert_close(forward(images[:size]), model(images[:size]), rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # nothing compiled after the warm-up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_cpu_stays_close_to_fp32(dtype: torch.dtype) -> None:
    reference = tiny_vit(image_size=224, num_classes=1000)
    half = tiny_vit(image_size=224, num_classes=1000).to(dtype)
    pixels = torch.stack([cpu_pixels(data) for data in photo_jpegs().values()])
    with torch.inference_mode():
        expected = reference(pixels)
        got = EagerForward(half)(pixels.to(dtype)).float()
    relative = ((got - expected).abs().max() / expected.abs().max()).item()
    assert relative < 0.03, relative  # measured: about 0.01 (bf16) and 0.002 (fp16)
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.85


# -- the device decode path, on the CPU ----------------------------------------------------------------------------


def test_device_decode_path_agrees_with_pil_on_real_photographs() -> None:
    """torchvision's decoder and the preset on uint8 tensors, against PIL: at most one grey level apart."""
    model = tiny_vit(image_size=224, num_classes=1000)
    for name, data in photo_jpegs().items():
        expected, got = cpu_pixels(data), device_pixels(data)
        difference = (expected - got).abs()
        assert difference.mean().item() < 0.01, name  # measured: 0.0015 - 0.0032 (normalised units)
        assert difference.max().item() < 0.05, name  # measured: 0.018, one grey level
        with torch.inference_mode():
            a, b = model(expected[None])[0], model(got[None])[0]
        assert ((a - b).abs().max() / a.abs().max()).item() < 0.01, name  # measured: at most 0.004
        assert a.argmax() == b.argmax(), name


def test_same_size_images_are_preprocessed_together_with_the_same_result_in_their_order() -> None:
    """Two sizes, interleaved: each same-size group runs through the preset as one batch; every image's pixels are
    exactly those of the preset on it alone, and come back in the order given."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(300, 451), (240, 320), (300, 451), (300, 451), (240, 320), (128, 96)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    calls: list[tuple[int, ...]] = []

    def counting(image: Image.Image | torch.Tensor) -> torch.Tensor:
        assert isinstance(image, torch.Tensor)
        calls.append(tuple(image.shape))
        return PRESET(image)

    assert torch.equal(preprocess_decoded(images, PRESET), torch.stack([PRESET(image) for image in images]))
    got = preprocess_decoded(images, counting, together=True)
    assert sorted(calls) == sorted([(3, 3, 300, 451), (2, 3, 240, 320), (1, 3, 128, 96)])
    for image, pixels in zip(images, got, strict=True):
        assert torch.equal(pixels, PRESET(image))


def rotated_jpeg() -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo("chelsea")).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo("chelsea")).convert("CMYK").save(buffer, format="JPEG")
    return buffer.getvalue()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo("chelsea")).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (rotated_jpeg, "rotated by EXIF"),
        (cmyk_jpeg, "CMYK"),
        (png, "PNG"),
        (lambda: b"\xff\xd8\xffjunk\xff\xd9", "junk"),
        (lambda: jpeg(photo("chelsea"))[:-2000], "cut short"),
        (lambda: jpeg(photo("chelsea")) + b"\x00" * 16, "trailing bytes"),
    ],
)
def test_what_the_device_path_would_get_wrong_is_left_to_the_cpu(make: object, reason: str) -> None:
    assert probe_jpeg(make(), max_pixels=10**9) is None, reason  # type: ignore[operator]


def test_probe_checks_the_pixel_limit_from_the_header_and_takes_greyscale() -> None:
    data = jpeg(photo("camera"))  # 512x512 greyscale
    assert probe_jpeg(data, max_pixels=512 * 512 - 1) is None  # the CPU path then answers 413
    encoded = probe_jpeg(data, max_pixels=512 * 512)
    assert encoded is not None and (encoded.width, encoded.height) == (512, 512)
    assert bytes(encoded.data.numpy()) == data


def broken_jpeg() -> bytes:
    """A JPEG whose header is fine and whose scan is garbage: only a decoder finds out."""
    data = bytearray(jpeg(photo("chelsea")))
    start = data.index(b"\xff\xda")  # start of scan
    data[start + 20 : start + 4000] = b"\xff\x00" * ((4000 - 20) // 2)
    return bytes(data[: start + 4000])


def cpu_lane(forward: Forward) -> Lane:
    return preset_lane(forward, device=CPU, dtype=torch.float32, max_batch=4, per_forward=2)


def test_a_lane_mixes_cpu_and_device_images_in_order_and_fails_only_the_broken_one() -> None:
    model = tiny_vit(image_size=224, num_classes=1000)
    lane = cpu_lane(EagerForward(model))
    photos = list(photo_jpegs().values())
    chelsea, coffee = photos[0], photos[2]
    data = broken_jpeg()
    assert probe_jpeg(data, max_pixels=10**9) is None  # cut short: left to the CPU path
    broken = EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), data, 451, 300)  # as if it passed
    encoded = probe_jpeg(coffee, max_pixels=10**9)
    assert isinstance(encoded, EncodedJpeg)
    outputs = lane.run([cpu_pixels(chelsea), broken, encoded])
    assert isinstance(outputs[1], InvalidImage)
    with torch.inference_mode():
        expected = model(torch.stack([cpu_pixels(chelsea), device_pixels(coffee)]))
    torch.testing.assert_close(outputs[0].logits, expected[0], rtol=1e-4, atol=1e-4)  # type: ignore[union-attr]
    torch.testing.assert_close(outputs[2].logits, expected[1], rtol=1e-4, atol=1e-4)  # type: ignore[union-attr]
    torch.testing.assert_close(outputs[2].probs, expected[1].softmax(0))  # type: ignore[union-attr]


def test_a_lane_runs_a_batch_larger_than_its_forward_bound_in_chunks() -> None:
    model = FakeViT(num_classes=1000)
    model.release()
    lane = cpu_lane(EagerForward(model))  # at most 2 images a forward
    images = [torch.rand(3, 224, 224) for _ in range(4)]
    outputs = lane.run(images)
    assert model.batch_sizes == [2, 2]
    with torch.inference_mode():
        expected = model(torch.stack(images))
    for output, row in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output.logits, row)  # type: ignore[union-attr]


def test_memory_bound_arithmetic() -> None:
    gib = 2**30
    assert images_per_forward(100 * 2**20, 80 * gib, 0.5, 256) == 256  # 100 MiB an image: 409 fit, capped
    assert images_per_forward(1 * gib, 80 * gib, 0.5, 256) == 40
    assert images_per_forward(100 * gib, 80 * gib, 0.5, 256) == 1  # never fewer than one


# -- batches in flight and per-image failures in the batcher --------------------------------------------------------


async def test_two_batches_run_at_once_with_two_in_flight_and_each_image_gets_its_own_answer() -> None:
    both_in = threading.Barrier(2, timeout=10)

    def run(batch: list[int]) -> list[int | BaseException]:
        both_in.wait()  # only returns once two batches are running at the same time
        return [x * 10 if x != 7 else InvalidImage("seven") for x in batch]

    config = BatchingConfig(max_batch_size=2, max_queue_delay_ms=0, max_queue_size=16)
    batcher: Batcher[int, int] = Batcher(run, config, max_in_flight=2)
    await batcher.start()
    try:
        with batcher.admit(4) as admission:
            futures = admission.submit([1, 2, 3, 7], asyncio.get_running_loop().time() + 10)
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await batcher.stop(5)
    assert [r.value for r in results[:3]] == [10, 20, 30]  # type: ignore[union-attr]
    assert isinstance(results[3], InvalidImage)
    assert batcher.stats.batches == 2 and batcher.stats.failed_batches == 0


# -- the engine, end to end --------------------------------------------------------------------------------------


async def test_device_decode_through_the_api_answers_as_the_cpu_path_and_pins_a_broken_image(tmp_path: Path) -> None:
    """decode_device=cuda's whole path (probe in the decode pool, decode in the lane), with the CPU standing in."""
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=224, num_classes=1000))
    settings = Settings(model_repository=tmp_path, model=["tiny"], max_batch_size=4, drain_timeout_s=5)
    photos = list(photo_jpegs().values())[:3]
    results = {}
    for on_device in (False, True):
        engine = Engine.load(settings)
        engine.model().decode_on_device = on_device
        async with serve_in_process(engine, settings) as client:
            files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
            response = await client.post("/v1/classify", files=files)
            assert response.status_code == 200
            results[on_device] = [p["logits"] for p in response.json()["predictions"]]
            files.insert(1, ("image", ("broken.jpg", broken_jpeg(), "image/jpeg")))
            response = await client.post("/v1/classify", files=files)
            assert response.status_code == 400
            assert response.json()["index"] == 1 and response.json()["code"] == "invalid_image"
            assert (await client.get("/readyz")).status_code == 200
    device, cpu = np.array(results[True]), np.array(results[False])
    assert (np.abs(device - cpu).max(axis=1) / np.abs(cpu).max(axis=1)).max() < 0.01  # as in the test above
    assert np.argmax(results[True], axis=1).tolist() == np.argmax(results[False], axis=1).tolist()


def test_device_decode_without_a_gpu_is_refused_at_start(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit())
    with pytest.raises(ModelLoadError, match="decode_device cuda needs the models on a GPU"):
        Engine.load(Settings(model_repository=tmp_path, model=["tiny"], device="cpu", decode_device="cuda"))


async def test_model_info_says_how_batches_run() -> None:
    model = fake_served_model(acceleration=CPU_ACCELERATION)
    async with serve_in_process(fake_engine(model)) as client:
        info = (await client.get("/v1/models/fake")).json()
    assert info["acceleration"] == {
        "compile": False,
        "cuda_graphs": False,  # asked for by default, but this model is on the CPU
        "batch_buckets": [1, 2, 4, 8],
        "decode_device": "cpu",
        "decode_backend": None,
        "jpeg_draft": False,
        "pipeline_depth": 1,
        "max_images_per_forward": 8,
        "backend": "torch",
        "precision": "float",
        "explain_backend": None,  # the fake model's attention cannot be read
        "fast_path": None,  # torch fp32, decoded on the CPU at full scale: nothing for the accuracy gate to check
    }
    assert info["accuracy_gate"] is None
