"""The GPU check's summary: raw throughput, fast-path numerics, the service end to end, and the issue's two targets.

Reads what bench/gpu_raw.py and bench/gpu_serve.py wrote in OUT, prints Markdown (bench/gpu_check.sh tees it to
OUT/summary.md). Missing parts (a step that failed or ran out of time) are said to be missing, never filled in.

    python bench/gpu_report.py OUT
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

RAW_MODES = ("graphs", "eager", "compiled")


def load(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def raw_table(raw: dict[str, Any]) -> list[str]:
    sizes = raw["config"]["batch_sizes"]
    lines = ["| dtype / mode | " + " | ".join(f"b={b}" for b in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    cells = {(c["dtype"], c["mode"], c["batch_size"]): c for c in raw["cells"]}
    for dtype in raw["config"]["dtypes"]:
        for mode in raw["config"]["modes"]:
            row = [cells.get((dtype, mode, b), {}) for b in sizes]
            if not any(c.get("images_per_s") for c in row):
                reasons = {c.get("reason") or c.get("error") or "not run" for c in row}
                lines.append(f"| {dtype} {mode} | " + "; ".join(sorted(map(str, reasons)))[:80] + " |")
                continue
            values = [fmt(c.get("images_per_s")) if c.get("images_per_s") else "-" for c in row]
            lines.append(f"| {dtype} {mode} | " + " | ".join(values) + " |")
    return lines


def raw_fp16_at(raw: dict[str, Any], batch: float) -> tuple[float | None, str]:
    """The best fp16 raw images/s at `batch` (log-linear between the measured batch sizes), and which mode."""
    best: tuple[float | None, str] = (None, "")
    for mode in RAW_MODES:
        points = sorted(
            (c["batch_size"], c["images_per_s"])
            for c in raw["cells"]
            if c["dtype"] == "fp16" and c["mode"] == mode and c.get("images_per_s")
        )
        if not points:
            continue
        value = interpolate(points, batch)
        if best[0] is None or value > best[0]:
            best = (value, mode)
    return best


def interpolate(points: list[tuple[int, float]], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[-1][1]


def checks_table(raw: dict[str, Any]) -> list[str]:
    lines = ["| path (against fp32 eager) | max relative error | top-1 agreement |", "|---|---|---|"]
    for check in raw.get("checks", []):
        if check["status"] == "ok":
            lines.append(
                f"| {check['dtype']} {check['mode']} | {check['max_rel_err']:.4f} | {check['top1_agreement']:.3f} |"
            )
    return lines


def mps_note(row: dict[str, Any]) -> str:
    """Whether a configuration that asked for CUDA MPS had it: on, unavailable, or failed (then it ran without)."""
    return "" if row.get("mps", "off") == "off" else f" [MPS: {row['mps']}]"


def serve_table(serve: dict[str, Any], raw: dict[str, Any] | None) -> list[str]:
    lines = [
        "| config | image | conc. | images/s | p50 ms | p99 ms | errors | mean batch | prepare ms/img | batch ms "
        "| raw fp16 at that batch | ratio |",
        "|---" * 12 + "|",
    ]
    for row in serve["rows"]:
        raw_value, mode = raw_fp16_at(raw, row["mean_batch"]) if raw and row.get("mean_batch") else (None, "")
        ratio = row["images_per_s"] / raw_value if raw_value else None
        lines.append(
            f"| {row['config']}{mps_note(row)} | {row['workload']} | {row['concurrency']} | {fmt(row['images_per_s'])} "
            f"| {fmt(row['p50_ms'], 1)} | {fmt(row['p99_ms'], 1)} | {sum(row['errors'].values())} "
            f"| {fmt(row.get('mean_batch'), 1)} | {fmt(row.get('prepare_ms_per_image'), 2)} "
            f"| {fmt(row.get('batch_ms'), 1)} | {fmt(raw_value)} {mode} | {fmt(ratio, 2)} |"
        )
    return lines


def targets(serve: dict[str, Any], raw: dict[str, Any] | None) -> list[str]:
    lines = []
    first = serve["rows"][0]["config"] if serve["rows"] else ""
    photo = [r for r in serve["rows"] if r["workload"] == "photo" and r.get("mean_batch")]  # the best configuration
    if photo and raw:
        best = max(photo, key=lambda r: r["images_per_s"])
        raw_value, mode = raw_fp16_at(raw, best["mean_batch"])
        if raw_value:
            ratio = best["images_per_s"] / raw_value
            lines.append(
                f"- 1920x1280 JPEGs end to end ({best['config']}): {best['images_per_s']:,.0f} images/s at concurrency "
                f"{best['concurrency']} (mean batch {best['mean_batch']:.1f}) = {ratio:.2f} of raw fp16 {mode} at that "
                f"batch ({raw_value:,.0f}/s); target 0.5: {'met' if ratio >= 0.5 else 'MISSED'}"
            )
    small = [r for r in serve["rows"] if r["config"] == first and r["workload"] == "small" and r["concurrency"] == 1]
    if small and small[0]["p50_ms"] is not None:
        p50 = small[0]["p50_ms"]
        lines.append(
            f"- small JPEG, concurrency 1: p50 {p50:.2f} ms; target < 10 ms: {'met' if p50 < 10 else 'MISSED'}"
        )
    return lines or ["- not measured (the service step did not finish)"]


def stages_table(stages: dict[str, Any]) -> list[str]:
    lines = [
        "| batch | nvJPEG decode (one call) | preset one image at a time | preset, same-size images together "
        "| forward (fp16 graphs) |",
        "|---" * 5 + "|",
    ]
    for row in stages["rows"]:
        lines.append(
            f"| {row['batch']} | {row['decode_ms']:.2f} ms | {row['preset_one_at_a_time_ms']:.2f} ms "
            f"| {row['preset_together_ms']:.2f} ms | {row['forward_ms']:.2f} ms |"
        )
    return lines


def main(out: Path) -> None:
    raw = load(out / "gpu_raw.json")
    serve = load(out / "gpu_serve.json")
    device = (serve or {}).get("device") or ((raw or {}).get("device") or {}).get("name", "unknown device")
    date = (serve or raw or {}).get("date", "unknown date")
    print(f"# GPU check: {device}, {date}\n")
    print("## Raw ViT-B/16 throughput (images/s; model only, inputs already on the GPU)\n")
    print("\n".join(raw_table(raw)) if raw else "missing: gpu_raw.json")
    if raw:
        print("\n## Fast paths against fp32 eager (8 fresh random inputs)\n")
        print("\n".join(checks_table(raw)))
    if serve and serve.get("numerics"):
        n = serve["numerics"]
        for name, values in n.items():
            if isinstance(values, dict):
                print(
                    f"\nGPU decode ({name}) against CPU decode, {n['photos']} photographs through the API: top-1 "
                    f"agreement {values['top1_agreement']:.3f}, max relative logit error "
                    f"{values['max_relative_error']:.4f} (mean {values['mean_relative_error']:.4f})"
                )
    print("\n## The service end to end (ViT-B/16 fp16, max batch 64, real HTTP, one image a request)\n")
    print("\n".join(serve_table(serve, raw)) if serve else "missing: gpu_serve.json")
    if serve and serve.get("perf_analyzer"):
        print("\nperf_analyzer (OIP; random tensors, then the 1920x1280 JPEG):")
        for line in serve["perf_analyzer"]["lines"]:
            print(f"    {line}")
    stages = load(out / "gpu_stages.json")
    print("\n## Where a batch of 1920x1280 JPEGs spends its time on the device (median, synchronised)\n")
    print("\n".join(stages_table(stages)) if stages else "missing: gpu_stages.json")
    print("\n## Targets\n")
    print("\n".join(targets(serve, raw)) if serve else "- not measured (the service step did not finish)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
