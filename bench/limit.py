"""The offline limit: the service's own pipeline (decode, preprocess, batched forward, softmax, top-5) in one
process, without HTTP or a batcher. Prints one JSON object per model and workload.

    python bench/limit.py WORK_DIR SECONDS

With `--backends` (names from `VARIANTS`, e.g. torch,onnxruntime,openvino-int8), the limit of each backend variant
instead: the forward is the one the service runs, the backend's `Forward` built from a `ForwardPlan` (exported to ONNX
under `--export-dir`, int8 calibrated on the built-in photographs preprocessed by the same preset), and each record
also says where a batch's time goes (decode + preprocess, forward + top-5, per image). One JSON object per model,
workload and backend:

    python bench/limit.py WORK_DIR SECONDS --backends torch,openvino --models base --workloads small
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.config.settings import Precision
from app.engine.accuracy_gate import PHOTOS, image_files
from app.pipeline.decode import decode
from app.pipeline.image_scan import ImageLimits
from app.pipeline.preprocess import PreprocessParams, build_preprocessor, preprocess
from app.runtime.backends.base import ForwardPlan
from app.runtime.backends.registry import backend_for
from app.runtime.device import DTYPES
from app.runtime.runner import Forward, batch_buckets
from bench.workload import MAX_BATCH, MODELS, WORKLOADS, model

PRESET = build_preprocessor(PreprocessParams(crop_size=224, resize_size=256))
INPUT_SHAPE = (3, 224, 224)


@dataclass(frozen=True, slots=True)
class Variant:
    """One way the service can run a model's forward: its `--backend`, `--precision` and `--dtype`."""

    backend: str
    precision: Precision = "float"
    dtype: str = "fp32"

    @property
    def flags(self) -> list[str]:
        return ["--backend", self.backend, "--precision", self.precision, "--dtype", self.dtype]


VARIANTS = {
    "torch": Variant("torch"),
    "onnxruntime": Variant("onnxruntime"),
    "openvino": Variant("openvino"),
    "openvino-bf16": Variant("openvino", dtype="bf16"),
    "onnxruntime-int8": Variant("onnxruntime", "int8"),
    "openvino-int8": Variant("openvino", "int8"),
}


def prepare(data: bytes) -> torch.Tensor:
    return preprocess(decode(data, limits=ImageLimits(max_pixels=40_000_000)), PRESET)


def forward_top5(module: torch.nn.Module, batch: torch.Tensor) -> list[list[int]]:
    with torch.inference_mode():
        return module(batch).softmax(dim=-1).topk(5, dim=-1).indices.tolist()  # type: ignore[no-any-return]


def timed(fn: Callable[[], object], seconds: float) -> list[float]:
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main(work: Path, seconds: float) -> None:
    pool = ThreadPoolExecutor(2)
    for name in MODELS:
        module = model(name)
        for workload in WORKLOADS:
            data = (work / f"w_{workload}.jpg").read_bytes()
            batch = [data] * MAX_BATCH
            serial = functools.partial(
                lambda m, b: forward_top5(m, torch.stack([prepare(d) for d in b])), module, batch
            )
            two_threads = functools.partial(
                lambda m, b: forward_top5(m, torch.stack(list(pool.map(prepare, b)))), module, batch
            )
            single = functools.partial(lambda m, d: forward_top5(m, prepare(d)[None]), module, data)
            for fn in (serial, two_threads, single):
                fn()  # warm-up
            b16 = timed(serial, seconds)
            b16_par = timed(two_threads, seconds)
            b1 = timed(single, seconds / 2)
            record = {
                "model": name,
                "workload": workload,
                "b16_img_s": MAX_BATCH * len(b16) / sum(b16),
                "b16_2thread_img_s": MAX_BATCH * len(b16_par) / sum(b16_par),
                "b1_img_s": len(b1) / sum(b1),
                "b1_p50_ms": 1000 * statistics.median(b1),
            }
            print(json.dumps(record), flush=True)
    pool.shutdown()


def calibration() -> list[torch.Tensor]:
    """int8's calibration images: the built-in photographs, preprocessed as the workload is."""
    return [prepare(path.read_bytes()) for path in image_files(PHOTOS)]


def backend_forward(name: str, variant: Variant, export_dir: Path) -> tuple[Forward, torch.dtype]:
    """The forward the service would run for model `name` on `variant` (export, quantise, compile: done here), and
    the dtype its input is in."""
    backend = backend_for(variant.backend)
    dtype = DTYPES[variant.dtype]
    device = torch.device("cpu")
    backend.check(device, dtype, variant.precision)
    module_dtype = backend.module_dtype(dtype)
    plan = ForwardPlan(
        name=f"m{name}",
        module=model(name).to(module_dtype),
        device=device,
        dtype=dtype,
        precision=variant.precision,
        input_shape=INPUT_SHAPE,
        buckets=batch_buckets(MAX_BATCH),
        export_dir=export_dir,
        fingerprint=f"bench.workload.model({name!r})",
        calibration=calibration,
        threads=torch.get_num_threads(),
    )
    forward = backend.prepare(plan)()
    forward.warm_up(torch.zeros((MAX_BATCH, *INPUT_SHAPE), dtype=module_dtype))
    return forward, module_dtype


def backend_limit(
    name: str, workload: str, variant_name: str, forward: Forward, dtype: torch.dtype, data: bytes, seconds: float
) -> dict[str, Any]:
    """One backend variant's limit on one workload; the serial batch's time split into its two stages."""

    def top5(batch: torch.Tensor) -> list[list[int]]:
        with torch.inference_mode():
            return forward(batch.to(dtype)).float().softmax(dim=-1).topk(5, dim=-1).indices.tolist()

    stages: list[tuple[float, float, float]] = []

    def serial() -> None:
        started, cpu = time.perf_counter(), time.process_time()
        batch = torch.stack([prepare(data) for _ in range(MAX_BATCH)])
        prepared = time.perf_counter()
        top5(batch)
        stages.append((prepared - started, time.perf_counter() - prepared, time.process_time() - cpu))

    with ThreadPoolExecutor(2) as pool:

        def two_threads() -> None:
            top5(torch.stack(list(pool.map(prepare, [data] * MAX_BATCH))))

        def half() -> None:  # the service's batches when its clients' images arrive in two waves
            top5(torch.stack(list(pool.map(prepare, [data] * (MAX_BATCH // 2)))))

        def decoded() -> torch.Tensor:
            return torch.stack(list(pool.map(prepare, [data] * MAX_BATCH)))

        ahead = ThreadPoolExecutor(1)
        upcoming = [ahead.submit(decoded)]

        def overlapped() -> None:  # as the service runs: the next batch decoded while this one's forward runs
            batch = upcoming.pop().result()
            upcoming.append(ahead.submit(decoded))
            top5(batch)

        def single() -> None:
            top5(prepare(data)[None])

        for fn in (serial, two_threads, half, single):
            fn()  # warm-up
        stages.clear()
        b16 = timed(serial, seconds)
        b16_par = timed(two_threads, seconds)
        b8_par = timed(half, seconds / 2)
        b1 = timed(single, seconds / 2)
        overlapped()  # warm-up
        b16_overlapped = timed(overlapped, seconds / 2)
        upcoming.pop().result()
        ahead.shutdown()
    images = MAX_BATCH * len(stages)
    return {
        "model": name,
        "workload": workload,
        "backend": variant_name,
        "b16_img_s": MAX_BATCH * len(b16) / sum(b16),
        "b16_2thread_img_s": MAX_BATCH * len(b16_par) / sum(b16_par),
        "b8_2thread_img_s": MAX_BATCH // 2 * len(b8_par) / sum(b8_par),
        "b16_overlapped_img_s": MAX_BATCH * len(b16_overlapped) / sum(b16_overlapped),
        "b1_img_s": len(b1) / sum(b1),
        "b1_p50_ms": 1000 * statistics.median(b1),
        "prepare_ms_per_img": 1000 * sum(s[0] for s in stages) / images,
        "forward_ms_per_img": 1000 * sum(s[1] for s in stages) / images,
        "cpu_ms_per_img": 1000 * sum(s[2] for s in stages) / images,  # every thread of the process: like the server's
    }


def backend_limits(
    work: Path, seconds: float, variants: list[str], models: list[str], workloads: list[str], export_dir: Path
) -> None:
    for name in models:
        for variant_name in variants:
            started = time.perf_counter()
            forward, dtype = backend_forward(name, VARIANTS[variant_name], export_dir)
            prepared_s = time.perf_counter() - started
            for workload in workloads:
                data = (work / f"w_{workload}.jpg").read_bytes()
                record = backend_limit(name, workload, variant_name, forward, dtype, data, seconds)
                print(json.dumps(record | {"prepare_backend_s": prepared_s}), flush=True)
            del forward  # its runtime's threads and memory, before the next variant's


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the folder bench.workload.write filled")
    parser.add_argument("seconds", type=float, help="each measured window")
    parser.add_argument("--backends", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--models", default=",".join(MODELS), help="with --backends")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="with --backends")
    parser.add_argument("--export-dir", type=Path, help="with --backends: the ONNX export cache (default: a temp dir)")
    args = parser.parse_args()
    if args.backends is None:
        main(args.work, args.seconds)
        return
    variants = args.backends.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown backend variants {unknown}: known are {', '.join(VARIANTS)}")
    export_dir = args.export_dir or Path(tempfile.mkdtemp(prefix="vit-serve-limit-exports-"))
    backend_limits(args.work, args.seconds, variants, args.models.split(","), args.workloads.split(","), export_dir)


if __name__ == "__main__":
    cli()
