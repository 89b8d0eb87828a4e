"""`make bench`: the benchmark matrix against vit-serve and, in the same run, the baseline and the offline limit.

For each model (M-tiny, M-base) and workload (W-small, W-photo): vit-serve (its CLI, model folders with the
benchmark's weights, max batch 16, max delay 10 ms) and the naive FastAPI server (bench/naive_server.py), each
loaded by wrk (one thread, connections = concurrency; a warm-up, a drain, then the measured window), and the offline
limit (bench/limit.py). Writes bench/results/<date>-<machine>.md, .json and .png.

    python bench/run.py [--quick] [--models tiny,base] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.workload import MODELS, WORKLOADS, write  # noqa: E402

# model -> (concurrency levels, measured seconds, warm-up seconds): the peers' matrix
MATRIX = {"tiny": ([1, 4, 16, 64], 20, 5), "base": ([1, 16], 30, 5)}
SERVERS = ("vit-serve", "naive", "vit-serve-draft", "vit-serve-2w")
# Variants measured on some cells only (model, workload): the opt-in --jpeg-draft path matters for large JPEGs only,
# where decode dominates; --workers 2 where one process's HTTP handling and decode share 2 cores with a light forward.
VARIANT_CELLS = {"vit-serve-draft": {("tiny", "photo")}, "vit-serve-2w": {("tiny", "small"), ("tiny", "photo")}}
VARIANT_FLAGS = {"vit-serve-draft": ["--jpeg-draft"], "vit-serve-2w": ["--workers", "2"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, data: bytes, timeout: float = 300) -> float:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/jpeg"}, method="POST")
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def start(
    server: str, model: str, work: Path, port: int, log: Path, flags: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A server of the matrix on `port`; vit-serve's with `flags` (default: its variant's, VARIANT_FLAGS)."""
    if server.startswith("vit-serve"):
        command = [
            str(Path(sys.executable).parent / "vit-serve"),
            "serve",
            "--model-repository",
            str(work / "models"),
            "--model",
            f"m{model}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *(VARIANT_FLAGS.get(server, []) if flags is None else flags),
        ]
        url = f"http://127.0.0.1:{port}/v1/classify?logits=false"
    else:
        command = [sys.executable, str(HERE / "naive_server.py")]
        url = f"http://127.0.0.1:{port}/predict"
    env = {**os.environ, "PORT": str(port), "MODEL": model, "VIT_GRPC_PORT": "0"}  # vit-serve: HTTP only
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, url


def wait_answering(url: str, data: bytes, process: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            post(url, data, timeout=120)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server never answered")


def wrk(url: str, body: Path, connections: int, seconds: int) -> dict[str, Any]:
    env = {**os.environ, "BODY_FILE": str(body)}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "120s", "--latency"]
    result = subprocess.run(
        [*command, "-s", str(HERE / "post_file.lua"), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 200,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("WRKJSON "))
    return json.loads(line[8:])  # type: ignore[no-any-return]


def summary(result: dict[str, Any]) -> dict[str, float]:
    """One wrk window: requests a second, p50 and p99 in ms, and every kind of error."""
    return {
        "rate": result["requests"] / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": sum(result[k] for k in result if k.endswith("_errors")),
    }


def drain(url: str, data: bytes, idle_s: float) -> None:
    """After a warm-up, wait until a single request is fast again: the backlog must not leak into the window."""
    end = time.monotonic() + 120
    while time.monotonic() < end and post(url, data) > max(2 * idle_s, idle_s + 0.05):
        pass


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    import torch

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
    }


def machine_slug() -> str:
    """e.g. "amd-epyc-2core": the CPU's name and core count, for the results' file names."""
    cpu = machine()["cpu"].lower()
    words = "".join(ch if ch.isalnum() else " " for ch in cpu).split()
    kept = [w for w in words if w not in {"r", "tm", "processor", "cpu", "with", "radeon", "graphics"}][:3]
    return "-".join([*kept, f"{os.cpu_count()}core"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s windows, 1 s warm-ups: a smoke test")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian's package)")
    work = Path(tempfile.mkdtemp(prefix="vit-serve-bench-"))
    bodies = write(work)
    models = args.models.split(",")
    started_at = datetime.datetime.now(datetime.UTC)
    print(f"work dir {work}", flush=True)

    limit_s = 2 if args.quick else 8
    limits = [
        json.loads(line)
        for line in subprocess.run(
            [sys.executable, str(HERE / "limit.py"), str(work), str(limit_s)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    ]
    limits = [record for record in limits if record["model"] in models]
    for record in limits:
        print("limit", record, flush=True)

    cells: list[dict[str, Any]] = []
    for model in models:
        levels, seconds, warm = MATRIX[model]
        if args.quick:
            seconds, warm = 3, 1
        for server in SERVERS:
            workloads = [w for w in WORKLOADS if server not in VARIANT_CELLS or (model, w) in VARIANT_CELLS[server]]
            if not workloads:
                continue
            port = free_port()
            process, url = start(server, model, work, port, work / f"{server}-{model}.log")
            try:
                wait_answering(url, bodies["small"].read_bytes(), process)
                for workload in workloads:
                    data = bodies[workload].read_bytes()
                    idle_s = min(post(url, data) for _ in range(5))
                    for connections in levels:
                        wrk(url, bodies[workload], connections, warm)
                        drain(url, data, idle_s)
                        window = summary(wrk(url, bodies[workload], connections, seconds))
                        cell = {
                            "server": server,
                            "model": model,
                            "workload": workload,
                            "concurrency": connections,
                            "rps": window.pop("rate"),
                            **window,
                            "idle_ms": idle_s * 1000,
                        }
                        cells.append(cell)
                        print(
                            f"{server:15s} {model} {workload:5s} c={connections:<3d} {cell['rps']:8.1f} req/s "
                            f"p50 {cell['p50_ms']:8.1f} ms p99 {cell['p99_ms']:8.1f} ms errors {cell['errors']}",
                            flush=True,
                        )
            finally:
                stop(process)
    shutil.rmtree(work)

    name = f"{started_at:%Y-%m-%d}-{'quick-' if args.quick else ''}{machine_slug()}"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"started": started_at.isoformat(timespec="seconds"), "machine": machine(), "limits": limits}
    record["cells"] = cells
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    from bench.report import markdown, plot

    (args.out / f"{name}.md").write_text(markdown(record, quick=args.quick))
    plot(record, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.md, .json, .png")


if __name__ == "__main__":
    main()
