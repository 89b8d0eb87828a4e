"""Offline throughput of `vit-serve batch`: `--engine local` and `--engine ray` against the offline pipeline limit
(bench/limit.py's 2-thread batch of 16, measured here for M-tiny) and against `vit-serve predict` -> a server, all in
one sitting, on M-tiny with W-small and W-photo (bench/workload.py). Each job classifies a folder of hard links to the
workload's image. A batch job's rate is taken from the times its rows were written, between 10% and 90% of them, so
that what a job pays once (model loading, warm-up, Ray's cluster and actors) and its last stragglers drop out;
`predict`'s from its own summary (its server started and warm before). On a shared machine the rates move from one
minute to the next, so the limit and the jobs are measured in turns, `--rounds` times, and each is the median of its
rounds. Prints one JSON object per measurement and writes a Markdown table.

    python bench/batch.py [--seconds 10] [--rounds 3] [--out bench/results/<date>-batch-<machine>.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.limit import forward_top5, prepare, timed  # noqa: E402
from bench.run import free_port, machine_slug, start, stop, wait_answering  # noqa: E402
from bench.workload import MAX_BATCH, WORKLOADS, model, write  # noqa: E402

# A job's images, per workload: about `--seconds` of work at the rates this machine reaches (W-photo decodes a
# 1920x1280 JPEG an image).
IMAGES_PER_S = {"small": 300, "photo": 80}
RAY_ACTORS = 2
ENGINES = ("local", "ray", "predict")
# `vit-serve batch`'s job in a process of its own; its writer notes when each table of rows was written.
JOB = """
import json, sys, time
from pathlib import Path
import app.batch.job as job
from app.config.settings import Settings
folder, output, engine, concurrency = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
marks = []
open_writer = job.open_writer
class Noted:
    def __init__(self, writer): self.writer = writer
    def write(self, rows):
        self.writer.write(rows)
        marks.append((time.perf_counter(), rows.num_rows))
    def close(self): self.writer.close()
job.open_writer = lambda output, schema: Noted(open_writer(output, schema))
settings = Settings(model_repository=sys.argv[5], model=["mtiny"])
summary = job.run(job.Job([folder], output, settings, "mtiny", engine=engine, concurrency=concurrency, progress=False),
                  say=lambda line: None)
print(json.dumps({"seconds": summary.seconds, "startup_s": summary.startup_s, "images": summary.succeeded,
                  "failed": summary.failed, "workers": len(summary.workers), "marks": marks}))
"""


def offline_limit(work: Path, workload: str, seconds: float) -> float:
    """bench/limit.py's `b16_2thread_img_s` for M-tiny: a batch of 16 decoded on two threads, then its forward."""
    module = model("tiny")
    batch = [(work / f"w_{workload}.jpg").read_bytes()] * MAX_BATCH
    with ThreadPoolExecutor(2) as pool:

        def two_threads() -> None:
            forward_top5(module, torch.stack(list(pool.map(prepare, batch))))

        two_threads()
        times = timed(two_threads, seconds)
    return MAX_BATCH * len(times) / sum(times)


def image_folder(work: Path, workload: str, count: int) -> Path:
    folder = work / f"images-{workload}-{count}"
    folder.mkdir()
    for number in range(count):
        os.link(work / f"w_{workload}.jpg", folder / f"{number:06d}.jpg")
    return folder


def batch_job(work: Path, folder: Path, engine: str) -> dict[str, Any]:
    output = work / f"rows-{engine}-{os.getpid()}-{len(list(work.glob('rows-*')))}"
    command = [sys.executable, "-c", JOB, str(folder), str(output), engine, str(RAY_ACTORS), str(work / "models")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True, cwd=HERE.parent)
    record: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    record["img_s"] = middle_rate(record.pop("marks"))
    return record


def middle_rate(marks: list[tuple[float, int]]) -> float:
    """Rows/s between the writes that reach 10% and 90% of the rows."""
    total = sum(rows for _, rows in marks)
    done, first, last = 0, None, None
    for at, rows in marks:
        done += rows
        if first is None and done >= 0.1 * total:
            first = (at, done)
        if last is None and done >= 0.9 * total:
            last = (at, done)
    assert first is not None and last is not None
    return (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else 0.0


def predict_through_server(work: Path, folder: Path) -> dict[str, Any]:
    """`vit-serve predict` over the folder, through a server started (and warmed up) before."""
    port = free_port()
    process, url = start("vit-serve", "tiny", work, port, work / f"server-{folder.name}.log")
    try:
        wait_answering(url, (work / "w_small.jpg").read_bytes(), process)
        output = work / f"predict-{os.getpid()}-{len(list(work.glob('predict-*')))}.jsonl"
        vit_serve = str(Path(sys.executable).parent / "vit-serve")
        command = [vit_serve, "predict", str(folder), "--url", f"http://127.0.0.1:{port}", "--no-progress"]
        result = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, timeout=900)
    finally:
        stop(process)
    summary = result.stderr.strip().splitlines()[-1]
    rate = re.search(r"([\d.]+) images/s", summary)
    plan = next((line for line in result.stderr.splitlines() if " a request, " in line), "")
    return {"img_s": float(rate.group(1)) if rate else 0.0, "summary": summary, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="about how long each job runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started_at = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vit-serve-bench-batch-") as folder:
        work = Path(folder)
        write(work)
        for workload in WORKLOADS:
            images = image_folder(work, workload, int(IMAGES_PER_S[workload] * args.seconds))
            rounds: dict[str, list[Any]] = {"limit": [], **{engine: [] for engine in ENGINES}}
            for _ in range(args.rounds):
                rounds["limit"].append(offline_limit(work, workload, min(args.seconds / 2, 5)))
                print(workload, "limit", round(rounds["limit"][-1], 1), flush=True)
                for engine in ENGINES:
                    run = (
                        predict_through_server(work, images) if engine == "predict" else batch_job(work, images, engine)
                    )
                    rounds[engine].append(run)
                    print(workload, engine, json.dumps(run), flush=True)
            cell: dict[str, Any] = {"images": len(list(images.iterdir())), "rounds": rounds}
            cell["limit_img_s"] = statistics.median(rounds["limit"])
            for engine in ENGINES:
                cell[f"{engine}_img_s"] = statistics.median(run["img_s"] for run in rounds[engine])
            results[workload] = cell
    record = {
        "started": started_at.isoformat(timespec="seconds"),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "results": results,
    }
    print(json.dumps(record))
    out = args.out or HERE / "results" / f"{started_at:%Y-%m-%d}-batch-{machine_slug()}.md"
    out.write_text(markdown(record))
    print(f"wrote {out}")


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# `vit-serve batch` offline throughput, {record['started']}",
        "",
        "M-tiny (bench/workload.py), max batch 16, `python bench/batch.py`: images/s, each the median of its rounds "
        "(measured in turns: the limit, then each engine). Load average (1, 5, 15 min) before: "
        f"{_load(record['load_before'])}, after: {_load(record['load_after'])}.",
        "",
        "| workload | images a job | offline limit | local | local / limit | ray (2 actors) | ray / limit "
        "| predict -> server | predict / limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, cell in record["results"].items():
        limit = cell["limit_img_s"]
        rates = [cell[f"{engine}_img_s"] for engine in ENGINES]
        shown = " | ".join(f"{rate:.1f} | {rate / limit:.2f}" for rate in rates)
        lines.append(f"| W-{workload} | {cell['images']} | {limit:.1f} | {shown} |")
    lines += [
        "",
        "End to end (each job's images over its whole time, model loading, warm-up and Ray's start-up included; the "
        "median of its rounds):",
        "",
        "| workload | local | local / limit | ray (2 actors) | ray / limit | ray's start-up (s) |",
        "|---|---|---|---|---|---|",
    ]
    for workload, cell in record["results"].items():
        limit = cell["limit_img_s"]
        whole = {engine: end_to_end(cell, engine) for engine in ("local", "ray")}
        startup = statistics.median(run["startup_s"] for run in cell["rounds"]["ray"])
        lines.append(
            f"| W-{workload} | {whole['local']:.1f} | {whole['local'] / limit:.2f} | {whole['ray']:.1f} "
            f"| {whole['ray'] / limit:.2f} | {startup:.1f} |"
        )
    lines += ["", "Each round:", ""]
    for workload, cell in record["results"].items():
        for engine in ("limit", *ENGINES):
            runs = cell["rounds"][engine]
            values = [run if isinstance(run, float) else run["img_s"] for run in runs]
            lines.append(f"- W-{workload} {engine}: {', '.join(f'{v:.1f}' for v in values)}")
    lines += ["", "Raw:", "", "```json", json.dumps(record, indent=1), "```", ""]
    return "\n".join(lines)


def end_to_end(cell: dict[str, Any], engine: str) -> float:
    """A job's images over its whole time, the median of its rounds."""
    return float(statistics.median(cell["images"] / run["seconds"] for run in cell["rounds"][engine]))


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


if __name__ == "__main__":
    main()
