"""Where a batch of 1920x1280 JPEGs spends its time on the device, stage by stage, as the service runs them.

For batch sizes 1, 16 and 64 of the benchmark's photograph (W-photo: chelsea at 1920x1280, JPEG q90): nvJPEG decode
(one batched call, `app.pipeline.gpu_decode.decode_jpegs`), the model's
preset on the decoded images one at a time and with
same-size images together (`preprocess_decoded`; the service's default on a GPU), and the fp16 forward of ViT-B/16
(CUDA graphs, as served). Each is the median of `--repeats` synchronised runs after a warm-up.
Writes OUT/gpu_stages.json.

    python bench/gpu_stages.py --out DIR [--repeats 5] [--smoke]   # --smoke: a tiny model on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from app.pipeline.gpu_decode import EncodedJpeg, decode_jpegs, preprocess_decoded, probe_jpeg  # noqa: E402
from app.pipeline.preprocess import PreprocessParams, build_preprocessor  # noqa: E402
from app.runtime.runner import GraphedForward, batch_buckets  # noqa: E402
from tests.support.photos import jpeg, photo  # noqa: E402

BATCHES = (1, 16, 64)


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `run`, synchronised, after one warm-up run."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, decode and forward on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    data = jpeg(photo("chelsea"), size=(1920, 1280))
    encoded = probe_jpeg(data, max_pixels=10**9)
    assert encoded is not None
    preset = build_preprocessor(PreprocessParams(crop_size=224, resize_size=256))
    from torchvision.models import VisionTransformer, vit_b_16

    torch.manual_seed(0)
    if args.smoke:
        model = VisionTransformer(224, 16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
        forward: Callable[[torch.Tensor], torch.Tensor] = model.eval()
    else:
        model = vit_b_16(weights=None).to(device, torch.float16).eval()
        graphed = GraphedForward(model, batch_buckets(max(BATCHES)))
        with torch.inference_mode():  # as the service captures them
            graphed.warm_up(torch.randn(max(BATCHES), 3, 224, 224, device=device, dtype=torch.float16))
        forward = graphed
    dtype = torch.float32 if args.smoke else torch.float16
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in BATCHES:
            images: list[EncodedJpeg] = [encoded] * batch
            decoded = [image for image in decode_jpegs(images, device) if image is not None]
            pixels = preprocess_decoded(decoded, preset).to(dtype)
            row = {
                "batch": batch,
                "decode_ms": timed(partial(decode_jpegs, images, device), device, args.repeats),
                "preset_one_at_a_time_ms": timed(
                    partial(preprocess_decoded, decoded, preset, together=False), device, args.repeats
                ),
                "preset_together_ms": timed(
                    partial(preprocess_decoded, decoded, preset, together=True), device, args.repeats
                ),
                "forward_ms": timed(partial(forward, pixels), device, args.repeats),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_stages.json").write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
