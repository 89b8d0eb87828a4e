"""The CUDA fast paths on a real GPU: graphs, compiled graphs, pinned copies on side streams, nvJPEG, the memory bound,
and the whole service with all of them. Skipped where there is no GPU (bench/gpu_check.sh runs them on one)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config.settings import Settings
from app.engine.facade import Engine
from app.pipeline.gpu_decode import decode_jpegs, preprocess_decoded, probe_jpeg
from app.runtime.lanes import Lane
from app.runtime.runner import EagerForward, Forward, GraphedForward, batch_buckets, build_forward, compile_module
from tests.support.fakes import tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.lanes import PRESET, preset_lane, preset_pixels
from tests.support.photos import photo_jpegs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
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


async def test_the_service_on_the_gpu_with_every_fast_path_answers_each_request_its_own(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=224, num_classes=1000))
    photos = list(photo_jpegs().values())
    logits = {}
    for decode_device in ("cpu", "cuda"):
        settings = Settings(
            model_repository=tmp_path,
            model=["tiny"],
            device="cuda",
            dtype="fp16",
            cuda_graphs=True,
            decode_device=decode_device,
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
            logits[decode_device] = np.array([r.json()["predictions"][0]["logits"] for r in responses])
            model = engine.model()
            assert max(model.batcher.stats.batch_sizes) > 1  # concurrent requests were batched
            assert model.info().acceleration["cuda_graphs"] is True
    cpu, gpu = logits["cpu"], logits["cuda"]
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
