"""The CUDA fast paths on a real GPU: graphs, compiled graphs, pinned copies on side streams, nvJPEG, the memory bound,
and the whole service with all of them. Skipped where there is no GPU (bench/gpu_check.sh runs them on one)."""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config.settings import Settings
from app.engine.facade import Engine
from app.errors import InvalidImage
from app.pipeline.gpu_decode import EncodedJpeg, decode_jpegs, preprocess_decoded, probe_jpeg
from app.pipeline.jpeg_decoders import NVIMAGECODEC_MODULE, decode_backend
from app.runtime.lanes import Lane
from app.runtime.runner import EagerForward, Forward, GraphedForward, batch_buckets, build_forward, compile_module
from tests.support.fakes import tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.lanes import PRESET, preset_lane, preset_pixels
from tests.support.photos import photo_jpegs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
needs_nvimagecodec = pytest.mark.skipif(
    importlib.util.find_spec(NVIMAGECODEC_MODULE) is None, reason="needs nvImageCodec (the nvimagecodec extra)"
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def model_224() -> torch.nn.Module:
    model: torch.nn.Module = tiny_vit(image_size=224, num_classes=1000)
    return model.to(CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
def test_graphs_replay_what_the_module_computes_for_every_batch_size(dtype: str) -> None:
    model = model_224().to(DTYPES[dtype])
    forward = GraphedForward(model, batch_buckets(8))
    images = torch.randn(8, 3, 224, 224, device=CUDA, dtype=DTYPES[dtype])
    with torch.inference_mode():
        forward.warm_up(images)
        for size in range(1, 9):
            fresh = torch.randn(size, 3, 224, 224, device=CUDA, dtype=DTYPES[dtype])  # never the captured data
            expected = model(fresh)
            torch.testing.assert_close(forward(fresh).clone(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_the_gpu_stays_close_to_fp32(dtype: str) -> None:
    reference = model_224()
    half = model_224().to(DTYPES[dtype])
    images = torch.randn(16, 3, 224, 224, device=CUDA)
    with torch.inference_mode():
        expected = reference(images)
        got = half(images.to(DTYPES[dtype]))
    assert relative_error(got, expected) < 0.05
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.8


def test_compiled_graphs_match_eager_without_recompiling_while_serving() -> None:
    torch._dynamo.reset()
    model = model_224().half()
    forward = build_forward(model, device=CUDA, buckets=[1, 4], compiled=compile_module(model), cuda_graphs=True)
    images = torch.randn(4, 3, 224, 224, device=CUDA, dtype=torch.float16)
    with torch.inference_mode():
        forward.warm_up(images)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for size in (1, 3, 4):
            fresh = torch.randn(size, 3, 224, 224, device=CUDA, dtype=torch.float16)
            torch.testing.assert_close(forward(fresh).clone(), model(fresh), rtol=2e-2, atol=2e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def cuda_lane(forward: Forward, *, per_forward: int) -> Lane:
    return preset_lane(forward, device=CUDA, dtype=torch.float16, max_batch=8, per_forward=per_forward)


def test_a_lane_copies_through_pinned_memory_and_decodes_jpegs_with_nvjpeg() -> None:
    model = model_224().half()
    lane = cuda_lane(GraphedForward(model, batch_buckets(4)), per_forward=4)  # 8 images: two forwards of 4
    lane.warm_up(torch.randn(8, 3, 224, 224))
    photos = list(photo_jpegs().values())
    cpu = [preset_pixels(p) for p in photos[:4]]
    encoded = [probe_jpeg(p, max_pixels=10**9) for p in photos[:4]]
    assert all(e is not None for e in encoded)
    outputs = lane.run([*cpu, *encoded])  # type: ignore[list-item]
    with torch.inference_mode():
        expected = model(torch.stack(cpu).to(CUDA, torch.float16)).float().cpu()
    for i in range(4):
        torch.testing.assert_close(outputs[i].logits, expected[i], rtol=2e-2, atol=2e-2)  # type: ignore[union-attr]
    for i in range(4):  # nvJPEG and the GPU resize against PIL: the same top-1, logits close
        got = outputs[4 + i].logits  # type: ignore[union-attr]
        assert got.argmax() == expected[i].argmax()
        assert relative_error(got, expected[i]) < 0.05


def test_nvjpeg_and_gpu_resize_stay_close_to_pil() -> None:
    for name, data in photo_jpegs().items():
        expected = preset_pixels(data)
        encoded = probe_jpeg(data, max_pixels=10**9)
        assert encoded is not None
        decoded = decode_jpegs([encoded], CUDA)[0]
        assert decoded is not None
        got = preprocess_decoded([decoded], PRESET)[0].cpu()
        difference = (got - expected).abs()
        print(f"{name}: mean {difference.mean():.4f} max {difference.max():.4f} (normalised units)")
        # H100, 2026-11-27: mean 0.006-0.007, max 0.14-0.35 (coffee): nvJPEG's chroma upsampling is not libjpeg's,
        # so single pixels at sharp colour edges differ by up to ~20 grey levels (0.35 x 0.225 x 255)
        assert difference.mean().item() < 0.02, name
        assert difference.max().item() < 0.6, name


async def serve_photos(tmp_path: Path, decode_device: str, backend: str) -> np.ndarray:
    """The photographs' logits from the service on the GPU with every fast path, sent concurrently."""
    repository = tmp_path / f"{decode_device}-{backend}"
    write_model_folder(repository, "tiny", tiny_vit(image_size=224, num_classes=1000))
    photos = list(photo_jpegs().values())
    settings = Settings(
        model_repository=repository,
        model=["tiny"],
        device="cuda",
        dtype="fp16",
        cuda_graphs=True,
        decode_device=decode_device,
        decode_backend=backend,
        max_batch_size=8,
        max_queue_delay_ms=20,
        drain_timeout_s=10,
    )
    engine = Engine.load(settings)
    async with serve_in_process(engine, settings) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/classify", content=p, headers={"Content-Type": "image/jpeg"}) for p in photos)
        )
        assert [r.status_code for r in responses] == [200] * len(photos)
        model = engine.model()
        assert max(model.batcher.stats.batch_sizes) > 1  # concurrent requests were batched
        info = model.info().acceleration
        assert info["cuda_graphs"] is True
        assert info["decode_backend"] == (backend if decode_device == "cuda" else None)
    return np.array([r.json()["predictions"][0]["logits"] for r in responses])


async def test_the_service_on_the_gpu_with_every_fast_path_answers_each_request_its_own(tmp_path: Path) -> None:
    cpu = await serve_photos(tmp_path, "cpu", "torchvision")
    gpu = await serve_photos(tmp_path, "cuda", "torchvision")
    assert (cpu.argmax(1) == gpu.argmax(1)).all()
    assert (np.abs(cpu - gpu).max(1) / np.abs(cpu).max(1)).max() < 0.05


@needs_nvimagecodec
def test_nvimagecodec_and_gpu_resize_stay_close_to_pil() -> None:
    """The same bound as nvJPEG's above, the photographs decoded as one batch (the hardware decoder where there is
    one: A100, H100, H200)."""
    decoder = decode_backend("nvimagecodec", on_device=True).new_decoder(CUDA)
    photos = photo_jpegs()
    encoded = [probe_jpeg(data, max_pixels=10**9) for data in photos.values()]
    decoded = decoder.decode([e for e in encoded if e is not None], CUDA)
    assert len(decoded) == len(photos)
    for (name, data), image in zip(photos.items(), decoded, strict=True):
        assert image is not None, name
        assert image.shape[0] == 3 and image.dtype == torch.uint8 and image.device.type == "cuda"
        difference = (preprocess_decoded([image], PRESET)[0].cpu() - preset_pixels(data)).abs()
        print(f"{name}: mean {difference.mean():.4f} max {difference.max():.4f} (normalised units, nvImageCodec)")
        assert difference.mean().item() < 0.02, name
        assert difference.max().item() < 0.6, name


@needs_nvimagecodec
def test_a_jpeg_nvimagecodec_cannot_read_goes_to_the_cpu_path_alone() -> None:
    """A corrupt file past the probe (here forced in): the rest of the batch decodes on the device, it fails alone."""
    model = model_224().half()
    lane = cuda_lane(EagerForward(model), per_forward=8)
    lane = Lane(replace(lane.spec, decode_backend=decode_backend("nvimagecodec", on_device=True)), lane.forward)
    photos = list(photo_jpegs().values())[:3]
    encoded = [e for e in (probe_jpeg(p, max_pixels=10**9) for p in photos) if e is not None]
    garbage = b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9"
    corrupt = EncodedJpeg(torch.frombuffer(bytearray(garbage), dtype=torch.uint8), garbage, 64, 64)
    outputs = lane.run([encoded[0], corrupt, *encoded[1:]])
    assert isinstance(outputs[1], InvalidImage)
    with torch.inference_mode():
        expected = model(torch.stack([preset_pixels(p) for p in photos]).to(CUDA, torch.float16)).float().cpu()
    for got, want in zip([outputs[0], *outputs[2:]], expected, strict=True):
        assert got.logits.argmax() == want.argmax()  # type: ignore[union-attr]


@needs_nvimagecodec
async def test_the_service_with_nvimagecodec_answers_as_the_cpu_path(tmp_path: Path) -> None:
    cpu = await serve_photos(tmp_path, "cpu", "torchvision")
    gpu = await serve_photos(tmp_path, "cuda", "nvimagecodec")
    assert (cpu.argmax(1) == gpu.argmax(1)).all()
    assert (np.abs(cpu - gpu).max(1) / np.abs(cpu).max(1)).max() < 0.05


def test_the_memory_bound_splits_a_batch_into_forwards_that_fit(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=224, num_classes=1000))
    settings = Settings(
        model_repository=tmp_path, model=["tiny"], device="cuda", max_batch_size=16, batch_memory_fraction=1e-6
    )
    model = Engine.load(settings).model()
    model.warm_up()
    assert model.max_images_per_forward == 1  # a millionth of the device holds less than one image's forward
    assert model.buckets == [1]
    images = [torch.randn(3, 224, 224) for _ in range(5)]
    outputs = model.forward(list(images))  # a new list[Prepared]: list[Tensor] is not one (lists are invariant)
    reference = EagerForward(model._loaded.module)
    with torch.inference_mode():
        expected = reference(torch.stack(images).to(CUDA, torch.float16)).float().cpu()
    for output, row in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output.logits, row, rtol=2e-2, atol=2e-2)  # type: ignore[union-attr]


async def test_embeddings_and_explanations_on_the_gpu_match_the_cpu(tmp_path: Path) -> None:
    """The graphed fp16 forward's [logits | embedding] output, and the eager attention-reading forward in fp16,
    against fp32 on the CPU, on real photographs (decoded on the CPU both times, so the pixels are the same)."""
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=224, num_classes=1000))
    photos = list(photo_jpegs().values())[:4]
    files = [("image", (f"{i}.jpg", body, "image/jpeg")) for i, body in enumerate(photos)]
    found: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp16")):
        settings = Settings(
            model_repository=tmp_path,
            model=["tiny"],
            device=device,
            dtype=dtype,
            decode_device="cpu",
            max_batch_size=8,
            max_queue_delay_ms=20,
        )
        async with serve_in_process(Engine.load(settings), settings) as client:
            embedded = await client.post("/v1/embed", files=files)
            explained = await client.post("/v1/explain", files=files, params={"overlay": "true"})
        assert embedded.status_code == 200 and explained.status_code == 200, explained.text
        explanations = explained.json()["explanations"]
        assert all(e["overlay"].startswith("data:image/png;base64,") for e in explanations)
        found[device] = (
            np.array(embedded.json()["embeddings"]),
            np.array([e["attention"] for e in explanations]),
            [e["top_k"][0]["index"] for e in explanations],
        )
    (cpu_vectors, cpu_maps, cpu_top), (gpu_vectors, gpu_maps, gpu_top) = found["cpu"], found["cuda"]
    assert gpu_vectors.shape == (4, 32)
    assert relative_error(torch.from_numpy(gpu_vectors), torch.from_numpy(cpu_vectors)) < 0.02
    np.testing.assert_allclose(gpu_maps.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert np.abs(gpu_maps - cpu_maps).max() < 0.1 * cpu_maps.max()
    assert gpu_top == cpu_top
