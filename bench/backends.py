"""`make bench`, the backends: each backend variant's offline limit and the service on it, in one sitting.

For M-tiny (W-small, W-photo) and M-base (W-small): the offline limit of each variant (bench/limit.py --backends,
the service's own decode, preprocess and backend forward, batch 16, softmax top-5), then vit-serve on that variant
(`--backend`, `--precision`, `--dtype`; the model folders of bench/workload.py with the built-in photographs as their
`calibration/` images and `[accuracy_gate] min_top1_agreement = 0`, so that random weights start: the gate's figures
are recorded, from GET /v1/models/{name}), loaded by wrk at c=16 (and c=1 on M-tiny). Reports images/s, p50, the ratio
to torch in the same run, the ratio to the variant's own offline limit, the gate's figures, where each image's CPU time
goes, and the issue's goals, met or missed. Writes bench/results/<date>-backends-<machine>.md and .json.

    python bench/backends.py [--quick] [--models tiny,base] [--variants torch,openvino,...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from app.engine.accuracy_gate import PHOTOS, image_files  # noqa: E402
from bench.limit import VARIANTS  # noqa: E402
from bench.protocols import children_cpu_seconds, cpu_seconds  # noqa: E402
from bench.run import (  # noqa: E402
    drain,
    free_port,
    machine,
    machine_slug,
    post,
    start,
    stop,
    summary,
    wait_answering,
    wrk,
)
from bench.workload import MODELS, write  # noqa: E402

# model -> (workloads, concurrency levels, measured seconds, warm-up seconds)
# (shorter windows than bench/run.py's, so that six variants on two models fit one sitting)
MATRIX = {"tiny": (["small", "photo"], [1, 16], 10, 3), "base": (["small"], [16], 20, 5)}
GATE = "\n[accuracy_gate]\nmin_top1_agreement = 0\n"  # random weights: measure the gate, never refuse
# The issue's goals, on M-base W-small c=16: the best float backend and the best int8 one against torch, int8's top-1
# agreement on the photographs, and the service against its backend's own offline limit.
FLOAT_SPEEDUP, INT8_SPEEDUP, INT8_TOP1, SERVICE_SHARE = 1.5, 2.5, 0.99, 0.95


def model_folders(work: Path, models: list[str]) -> None:
    """The benchmark's folders with the photographs as calibration images and a gate that records only."""
    for name in models:
        folder = work / "models" / f"m{name}"
        # torchvision zero-initialises the head (every logit 0, every path agreeing trivially): draw it, seeded
        weights = torch.load(folder / "weights.pth", weights_only=True)
        head = weights["heads.head.weight"]
        weights["heads.head.weight"] = 0.5 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
        torch.save(weights, folder / "weights.pth")
        with (folder / "model.toml").open("a") as toml:
            toml.write(GATE)
        (folder / "calibration").mkdir(exist_ok=True)
        for photo in image_files(PHOTOS):
            shutil.copy(photo, folder / "calibration" / photo.name)


def offline(work: Path, model: str, variant: str, seconds: float) -> list[dict[str, Any]]:
    """bench/limit.py for one model and variant, in its own process (no runtime's threads left over from another)."""
    command = [sys.executable, str(HERE / "limit.py"), str(work), str(seconds), "--backends", variant]
    command += ["--models", model, "--workloads", ",".join(MATRIX[model][0]), "--export-dir", str(work / "exports")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or [f"status {result.returncode}"]
        return [{"model": model, "workload": w, "backend": variant, "error": tail[0]} for w in MATRIX[model][0]]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def batches(port: int, model: str) -> tuple[float, float]:
    """The server's batch-size histogram so far, as (images, batches): its sum and count in /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("sum", "count"):
            if line.startswith(f'vit_batch_size_{suffix}{{model="m{model}"}}'):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0), values.get("count", 0.0)


def description(port: int, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/m{model}", timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def serve(work: Path, bodies: dict[str, Path], model: str, variant: str, quick: bool) -> dict[str, Any]:
    """vit-serve on one variant: the gate's figures and one cell per workload and concurrency."""
    workloads, levels, seconds, warm = MATRIX[model]
    if quick:
        seconds, warm = 3, 1
    server = f"vit-serve-{variant}"
    log = work / f"{server}-{model}.log"
    port = free_port()
    flags = [*VARIANTS[variant].flags, "--weights-cache-dir", str(work / "cache")]
    process, url = start(server, model, work, port, log, flags)
    served: dict[str, Any] = {"model": model, "backend": variant, "cells": []}
    try:
        try:
            wait_answering(url, bodies["small"].read_bytes(), process)
        except RuntimeError as exc:
            lines = log.read_text().strip().splitlines()
            served["error"] = f"{exc}: {lines[-1] if lines else ''}"
            return served
        info = description(port, model)
        served["accuracy_gate"] = info.get("accuracy_gate")
        served["fast_path"] = info["acceleration"].get("fast_path")
        served["measured"] = info.get("measured")
        for workload in workloads:
            data = bodies[workload].read_bytes()
            idle_s = min(post(url, data) for _ in range(5))
            for connections in levels:
                wrk(url, bodies[workload], connections, warm)
                drain(url, data, idle_s)
                server_cpu, tool_cpu = cpu_seconds(process.pid), children_cpu_seconds()
                images_before, batches_before = batches(port, model)
                result = wrk(url, bodies[workload], connections, seconds)
                server_cpu, tool_cpu = cpu_seconds(process.pid) - server_cpu, children_cpu_seconds() - tool_cpu
                images_after, batches_after = batches(port, model)
                mean_batch = (images_after - images_before) / max(batches_after - batches_before, 1)
                requests = max(int(result["requests"]), 1)
                window = summary(result)
                cell = {
                    "model": model,
                    "workload": workload,
                    "backend": variant,
                    "concurrency": connections,
                    "img_s": window.pop("rate"),
                    **window,
                    "server_cpu_ms_per_img": 1000 * server_cpu / requests,
                    "wrk_cpu_ms_per_img": 1000 * tool_cpu / requests,
                    "mean_batch_size": mean_batch,
                }
                served["cells"].append(cell)
                print(
                    f"{variant:17s} m{model} {workload:5s} c={connections:<3d} {cell['img_s']:8.1f} img/s "
                    f"p50 {cell['p50_ms']:7.1f} ms server CPU {cell['server_cpu_ms_per_img']:.2f} ms/img",
                    flush=True,
                )
    finally:
        stop(process)
    return served


def limit_of(limits: list[dict[str, Any]], model: str, workload: str, backend: str) -> dict[str, Any] | None:
    return next(
        (
            x
            for x in limits
            if (x["model"], x["workload"], x["backend"]) == (model, workload, backend) and "error" not in x
        ),
        None,
    )


def best_limit(row: dict[str, Any] | None) -> float | None:
    """The offline limit: the better of serial and 2-thread decode (the service overlaps decode with the forward)."""
    return None if row is None else max(float(row["b16_img_s"]), float(row["b16_2thread_img_s"]))


def cells_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [cell for served in record["services"] for cell in served["cells"]]


def cell_of(record: dict[str, Any], model: str, workload: str, backend: str, c: int) -> dict[str, Any] | None:
    key = (model, workload, backend, c)
    return next(
        (x for x in cells_of(record) if (x["model"], x["workload"], x["backend"], x["concurrency"]) == key), None
    )


def gate_of(record: dict[str, Any], model: str, backend: str) -> dict[str, Any] | None:
    served = next((s for s in record["services"] if (s["model"], s["backend"]) == (model, backend)), None)
    return None if served is None else served.get("accuracy_gate")


def goals(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals on M-base (M-tiny when base was not run), W-small, c=16: each with its backend, the measured
    value, the target and whether it is met (never, where the value is missing)."""
    measured_models = {cell["model"] for cell in cells_of(record)}
    model = "base" if "base" in measured_models else "tiny"
    c16 = {b: cell_of(record, model, "small", b, 16) for b in record["variants"]}
    img_s = {b: float(cell["img_s"]) for b, cell in c16.items() if cell is not None}
    torch_img_s = img_s.get("torch")

    def best(precision: str) -> str | None:
        names = [b for b in img_s if b != "torch" and VARIANTS[b].precision == precision]
        return max(names, key=img_s.__getitem__, default=None)

    def speedup(backend: str | None) -> float | None:
        return None if backend is None or not torch_img_s else img_s[backend] / torch_img_s

    def share(backend: str | None) -> float | None:
        limit = None if backend is None else best_limit(limit_of(record["limits"], model, "small", backend))
        return None if backend is None or not limit else img_s[backend] / limit

    best_float, best_int8 = best("float"), best("int8")
    gate = gate_of(record, model, best_int8) if best_int8 else None
    rows = [
        (f"best float backend >= {FLOAT_SPEEDUP}x torch", best_float, speedup(best_float), FLOAT_SPEEDUP),
        (f"best int8 >= {INT8_SPEEDUP}x torch", best_int8, speedup(best_int8), INT8_SPEEDUP),
        (
            f"int8 top-1 agreement >= {INT8_TOP1} (photographs)",
            best_int8,
            None if gate is None else float(gate["top1_agreement"]),
            INT8_TOP1,
        ),
        (f"service >= {SERVICE_SHARE}x its offline limit", best_float, share(best_float), SERVICE_SHARE),
        (f"service >= {SERVICE_SHARE}x its offline limit", best_int8, share(best_int8), SERVICE_SHARE),
    ]
    return [
        {"model": model, "goal": goal, "backend": backend, "value": value, "target": target}
        | {"met": value is not None and value >= target}
        for goal, backend, value, target in rows
    ]


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(record: dict[str, Any]) -> str:
    info = record["machine"]
    quick = " (quick smoke run: 3 s windows, 1 s limits)" if record["quick"] else ""
    lines = [
        f"# vit-serve backends{quick}",
        "",
        f"Started {record['started']} on {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch "
        f"{info['torch']}, onnxruntime {info['onnxruntime']}, openvino {info['openvino']}; {info['wrk']}. Generated "
        "by `make bench` (bench/backends.py). M-tiny and M-base with seeded random weights (bench/workload.py), max "
        "batch 16, max delay 10 ms, `logits=false`; each variant's offline limit (bench/limit.py --backends: the "
        "service's decode, preprocess and backend forward, batch 16, softmax top-5) and the service on it (wrk, one "
        "thread, a warm-up and a drain before each window), in one sitting. One request = one image. The accuracy "
        "gate compared each fast path with torch fp32 on the built-in photographs (the models' calibration/).",
        "",
        "Variants: " + "; ".join(f"{name} = `{' '.join(flags)}`" for name, flags in record["variants"].items()) + ".",
        "",
        "## Offline limit per backend",
        "",
        "| model | workload | backend | batch-16 img/s | 2-thread decode img/s | / torch | batch-1 p50 ms "
        "| decode+preprocess ms/img | forward+top-5 ms/img |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in record["limits"]:
        if "error" in x:
            lines.append(f"| {x['model']} | {x['workload']} | {x['backend']} | failed: {x['error']} |||||||")
            continue
        torch_limit = best_limit(limit_of(record["limits"], x["model"], x["workload"], "torch"))
        own_limit = best_limit(x)
        ratio = own_limit / torch_limit if own_limit and torch_limit else None
        lines.append(
            f"| {x['model']} | {x['workload']} | {x['backend']} | {x['b16_img_s']:.1f} | {x['b16_2thread_img_s']:.1f} "
            f"| {_f(ratio, 2)} | {x['b1_p50_ms']:.1f} | {x['prepare_ms_per_img']:.2f} | {x['forward_ms_per_img']:.2f} |"
        )
    lines += [
        "",
        "## The service per backend",
        "",
        "| model | workload | backend | c | img/s | p50 ms | p99 ms | / torch | / offline limit | server CPU ms/img "
        "| wrk CPU ms/img | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for served in record["services"]:
        if "error" in served:
            lines.append(f"| {served['model']} | | {served['backend']} | | failed to start: {served['error']} ||||||||")
        for x in served["cells"]:
            torch_cell = cell_of(record, x["model"], x["workload"], "torch", x["concurrency"])
            limit = best_limit(limit_of(record["limits"], x["model"], x["workload"], x["backend"]))
            vs_torch = x["img_s"] / torch_cell["img_s"] if torch_cell else None
            lines.append(
                f"| {x['model']} | {x['workload']} | {x['backend']} | {x['concurrency']} | {x['img_s']:.1f} "
                f"| {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {_f(vs_torch, 2)} "
                f"| {_f(x['img_s'] / limit if limit else None, 2)} | {x['server_cpu_ms_per_img']:.2f} "
                f"| {x['wrk_cpu_ms_per_img']:.2f} | {x['errors']} |"
            )
    lines += [
        "",
        "## Accuracy gate (GET /v1/models/{name}; bound set to 0 for the bench)",
        "",
        "| model | backend | fast path | images | top-1 agreement | top-5 overlap | max rel. error | mean rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for served in record["services"]:
        gate = served.get("accuracy_gate")
        if gate:
            lines.append(
                f"| {served['model']} | {served['backend']} | {gate['path']} | {gate['images']} "
                f"| {gate['top1_agreement']:.4g} | {gate['top5_overlap']:.4g} | {gate['max_relative_error']:.3g} "
                f"| {gate['mean_relative_error']:.3g} |"
            )
        elif "error" not in served:
            lines.append(f"| {served['model']} | {served['backend']} | exact (torch fp32) | | | | | |")
    lines += ["", "## Goals", "", "| model | goal | backend | measured | target | |", "|---|---|---|---|---|---|"]
    rows = goals(record)
    for g in rows:
        verdict = "met" if g["met"] else "MISSED"
        lines.append(
            f"| {g['model']} | {g['goal']} | {g['backend'] or '-'} | {_f(g['value'], 3)} | {g['target']} | {verdict} |"
        )
    lines += [
        "",
        "## Where the time goes (W-small, c=16)",
        "",
        "Per image: the offline pipeline's decode + preprocess and forward + top-5 (wall time, serial batch of 16) and "
        "its CPU time (every thread of the process); the service's CPU time (server process, all its threads) and "
        "wrk's; beyond = server CPU - offline CPU (HTTP, batching, threads waking); the service's mean batch size "
        "(from vit_batch_size, over the measured window: a forward of fewer than 16 images costs more an image); "
        "cores busy = (server + wrk CPU) x img/s. 2 cores busy and no more img/s means the CPU is the limit; fewer "
        "means waiting. The offline limit at batch 8 (2-thread decode) beside the one at 16: what the service's "
        "batch size alone costs; and overlapped: batches of 16 with the next batch decoded (2 threads) while this "
        "one's forward runs, as the service does, on the same cores: what decode and forward cost each other.",
        "",
        "| model | backend | decode+pre ms | forward ms | offline CPU ms | server CPU ms | beyond ms | mean batch "
        "| wrk CPU ms | cores busy | limit b16 img/s | limit b8 img/s | overlapped img/s | service / overlapped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in cells_of(record):
        if (x["workload"], x["concurrency"]) != ("small", 16):
            continue
        row = limit_of(record["limits"], x["model"], "small", x["backend"])
        offline_cpu = None if row is None else row["cpu_ms_per_img"]
        b8 = None if row is None else row.get("b8_2thread_img_s")
        overlapped = None if row is None else row.get("b16_overlapped_img_s")
        busy = (x["server_cpu_ms_per_img"] + x["wrk_cpu_ms_per_img"]) * x["img_s"] / 1000
        lines.append(
            f"| {x['model']} | {x['backend']} | {_f(None if row is None else row['prepare_ms_per_img'], 2)} "
            f"| {_f(None if row is None else row['forward_ms_per_img'], 2)} | {_f(offline_cpu, 2)} "
            f"| {x['server_cpu_ms_per_img']:.2f} "
            f"| {_f(None if offline_cpu is None else x['server_cpu_ms_per_img'] - offline_cpu, 2)} "
            f"| {x['mean_batch_size']:.1f} | {x['wrk_cpu_ms_per_img']:.2f} | {busy:.2f} "
            f"| {_f(best_limit(row))} | {_f(b8)} | {_f(overlapped)} "
            f"| {_f(x['img_s'] / overlapped if overlapped else None, 2)} |"
        )
    missed = [g for g in rows if not g["met"]]
    if missed:
        lines += [
            "",
            "Missed: " + "; ".join(f"{g['goal']} ({g['backend']}: {_f(g['value'], 3)})" for g in missed) + ".",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s windows, 1 s warm-ups, 1 s limits: a smoke test")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian's package)")
    models, variants = args.models.split(","), args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS] + [m for m in models if m not in MATRIX]:
        parser.error(f"unknown models or variants: {unknown}")
    if "torch" not in variants:
        variants.insert(0, "torch")  # every ratio is to torch, measured in the same sitting
    work = Path(tempfile.mkdtemp(prefix="vit-serve-backends-"))
    print(f"work dir {work}", flush=True)
    bodies = write(work)
    model_folders(work, models)
    started_at = datetime.datetime.now(datetime.UTC)
    limits: list[dict[str, Any]] = []
    services: list[dict[str, Any]] = []
    for model in models:
        for variant in variants:
            for record in offline(work, model, variant, 1 if args.quick else 8):
                limits.append(record)
                print("limit", json.dumps(record), flush=True)
        for variant in variants:
            services.append(serve(work, bodies, model, variant, args.quick))
            if "error" in services[-1]:
                print(f"{variant} m{model}: {services[-1]['error']}", flush=True)
    shutil.rmtree(work)

    record = {
        "started": started_at.isoformat(timespec="seconds"),
        "machine": machine() | {"onnxruntime": version("onnxruntime"), "openvino": version("openvino")},
        "quick": args.quick,
        "variants": {name: VARIANTS[name].flags for name in variants},
        "limits": limits,
        "services": services,
    }
    text = markdown(record)
    name = f"{started_at:%Y-%m-%d}-backends-{'quick-' if args.quick else ''}{machine_slug()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(text)
    print(text[text.index("## Goals") :])
    print(f"wrote {args.out / name}.md and .json")


if __name__ == "__main__":
    main()
