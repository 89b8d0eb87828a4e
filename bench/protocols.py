"""gRPC against REST (binary tensors): the same server, model, images and load tool, in one sitting.

One vit-serve process with the benchmark's M-tiny (bench/workload.py) serving HTTP and gRPC; NVIDIA's perf_analyzer
(the Open Inference Protocol's load tool, ../shared/tools/perf_analyzer or $PERF_ANALYZER) sends real JPEGs as the
BYTES input `IMAGE` of model `mtiny`, `-i http` (binary tensor extension) and `-i grpc` (raw_input_contents), at
concurrency 16, one request = one image. For each workload (W-small, W-photo) the two protocols alternate for
`--rounds` rounds (the order swapped each round, so drift on the machine hits both alike); the table reports each
protocol's median round and the ratio gRPC / REST. Writes bench/results/<date>-protocols-<machine>.md and .json.

    python bench/protocols.py [--rounds 3] [--interval-ms 5000] [--concurrency 16] [--out bench/results]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.perf_analyzer_input import main as write_input  # noqa: E402
from bench.run import free_port, machine, machine_slug, post, stop, wait_answering  # noqa: E402
from bench.workload import WORKLOADS, write  # noqa: E402

PROTOCOLS = ("http", "grpc")
DEFAULT_PERF_ANALYZER = HERE.parent.parent / "shared" / "tools" / "perf_analyzer"


def perf_analyzer() -> str:
    found = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if found:
        return found
    if DEFAULT_PERF_ANALYZER.exists():
        return str(DEFAULT_PERF_ANALYZER)
    sys.exit("perf_analyzer not found: set PERF_ANALYZER (pip install perf-analyzer, glibc 2.38+)")


def start(work: Path, http_port: int, grpc_port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).parent / "vit-serve"),
        "serve",
        "--model-repository",
        str(work / "models"),
        "--model",
        "mtiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--log-level",
        "warning",
    ]
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def measure(
    tool: str, protocol: str, port: int, data: Path, args: argparse.Namespace, out: Path, server_pid: int
) -> dict[str, Any]:
    """One perf_analyzer run at one concurrency: infer/s and latency percentiles (ms) from its CSV; the CPU time
    the server and perf_analyzer spent per inference (ms), over the whole run."""
    command = [
        tool,
        "-m",
        "mtiny",
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        protocol,
        "--input-data",
        str(data),
        "--concurrency-range",
        f"{args.concurrency}:{args.concurrency}",
        "--measurement-interval",
        str(args.interval_ms),
        "--percentile",
        "50",
        "-f",
        str(out),
    ]
    server_cpu, tool_cpu, started = cpu_seconds(server_pid), children_cpu_seconds(), time.monotonic()
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    server_cpu, tool_cpu = cpu_seconds(server_pid) - server_cpu, children_cpu_seconds() - tool_cpu
    with out.open() as handle:
        row = next(csv.DictReader(handle))
    infer_per_s = float(row["Inferences/Second"])
    served = infer_per_s * wall  # perf_analyzer keeps the load on from its first window to its last
    return {
        "infer_per_s": infer_per_s,
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "server_cpu_ms": 1000 * server_cpu / served,
        "tool_cpu_ms": 1000 * tool_cpu / served,
    }


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """The CPU time of this process's finished children (perf_analyzer)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(rounds, key=lambda r: float(r["infer_per_s"]))[len(rounds) // 2]


def markdown(record: dict[str, Any]) -> str:
    info = record["machine"]
    lines = [
        "# gRPC against REST (binary tensors): M-tiny, real JPEGs, perf_analyzer",
        "",
        f"Measured {record['started']} UTC by `bench/protocols.py` on {info['cpu']} ({info['cores']} cores), Python "
        f"{info['python']}, torch {info['torch']}; perf_analyzer on the same cores as the server. One server process "
        f"(M-tiny, max batch 16, max delay 10 ms) serving both protocols; model `mtiny` (BYTES `IMAGE`, one JPEG a "
        f"request), concurrency {record['concurrency']}, {record['interval_ms']} ms windows, {record['rounds']} "
        "alternating rounds a protocol (the median round is reported).",
        "",
        "| workload | REST infer/s | gRPC infer/s | gRPC / REST | REST p50 ms | gRPC p50 ms | REST p99 ms "
        "| gRPC p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpu = [
        "",
        "Where the two cores went, per inference (CPU ms, the median round; the server's includes decode and forward,"
        " the same work for both protocols):",
        "",
        "| workload | server, REST | server, gRPC | perf_analyzer, REST | perf_analyzer, gRPC |",
        "|---|---|---|---|---|",
    ]
    for workload, cell in record["cells"].items():
        rest, grpc = cell["http"], cell["grpc"]
        lines.append(
            f"| W-{workload} | {rest['infer_per_s']:.1f} | {grpc['infer_per_s']:.1f} | "
            f"{grpc['infer_per_s'] / rest['infer_per_s']:.2f} | {rest['p50_ms']:.1f} | {grpc['p50_ms']:.1f} | "
            f"{rest['p99_ms']:.1f} | {grpc['p99_ms']:.1f} |"
        )
        cpu.append(
            f"| W-{workload} | {rest['server_cpu_ms']:.2f} | {grpc['server_cpu_ms']:.2f} | {rest['tool_cpu_ms']:.2f} | "
            f"{grpc['tool_cpu_ms']:.2f} |"
        )
    lines += [*cpu, "", "Every round (infer/s):", ""]
    for workload, cell in record["cells"].items():
        for protocol in PROTOCOLS:
            rounds = ", ".join(f"{r['infer_per_s']:.1f}" for r in cell["rounds"][protocol])
            lines.append(f"- W-{workload} {protocol}: {rounds}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    tool = perf_analyzer()
    work = Path(tempfile.mkdtemp(prefix="vit-serve-protocols-"))
    started_at = datetime.datetime.now(datetime.UTC)
    bodies = write(work)
    http_port, grpc_port = free_port(), free_port()
    process = start(work, http_port, grpc_port, work / "server.log")
    url = f"http://127.0.0.1:{http_port}/v1/classify?logits=false"
    cells: dict[str, Any] = {}
    try:
        wait_answering(url, bodies["small"].read_bytes(), process)
        for workload in WORKLOADS:
            data = work / f"{workload}.json"
            write_input(str(data), [str(bodies[workload])])
            post(url, bodies[workload].read_bytes())
            rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in PROTOCOLS}
            for index in range(args.rounds):
                order = PROTOCOLS if index % 2 == 0 else PROTOCOLS[::-1]
                for protocol in order:
                    port = http_port if protocol == "http" else grpc_port
                    result = measure(tool, protocol, port, data, args, work / "out.csv", process.pid)
                    rounds[protocol].append(result)
                    print(f"W-{workload} {protocol:4s} round {index + 1}: {result}", flush=True)
                    time.sleep(1)  # let the last requests' batches finish before the other protocol's window
            cells[workload] = {p: _median_round(rounds[p]) for p in PROTOCOLS} | {"rounds": rounds}
    finally:
        stop(process)
    record = {
        "started": started_at.isoformat(timespec="seconds"),
        "machine": machine(),
        "concurrency": args.concurrency,
        "interval_ms": args.interval_ms,
        "rounds": args.rounds,
        "cells": cells,
    }
    shutil.rmtree(work)
    name = f"{started_at:%Y-%m-%d}-protocols-{machine_slug()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(record))
    print(f"wrote {args.out / name}.md and .json")


if __name__ == "__main__":
    main()
