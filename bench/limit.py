"""The offline limit: the service's own pipeline (decode, preprocess, batched forward, softmax, top-5) in one
process, without HTTP or a batcher. Prints one JSON object per model and workload.

    python bench/limit.py WORK_DIR SECONDS
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.pipeline.decode import decode
from app.pipeline.image_scan import ImageLimits
from app.pipeline.preprocess import PreprocessParams, build_preprocessor, preprocess
from bench.workload import MAX_BATCH, MODELS, WORKLOADS, model

PRESET = build_preprocessor(PreprocessParams(crop_size=224, resize_size=256))


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


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]))
