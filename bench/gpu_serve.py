"""End to end on a GPU: vit-serve (ViT-B/16) over real HTTP with real JPEGs, in several configurations.

For each configuration a real `vit-serve serve` process is started on the GPU and loaded by bench/loadgen.py with the
benchmark's two images (W-small: chelsea 451x300, W-photo: the same at 1920x1280, JPEG q90) at several concurrencies.
Around each level /metrics is read, so every row also says where the time went: the mean batch size, decode and
preprocess time per image on the CPU, queue wait and forward time per batch. Then the same photographs go through the
GPU-decode servers (torchvision's nvJPEG, nvImageCodec) and the CPU-decode one and their logits are compared (top-1
agreement, relative error). Several workers on one GPU run with and without CUDA MPS (where nvidia-cuda-mps-control
exists: a daemon started for that configuration alone, in temporary folders), and against fewer, larger processes.

The weights are random (the GPU host has no network): throughput and latency do not depend on them.

    python bench/gpu_serve.py --out DIR [--duration 8] [--warmup 2] [--quick] [--perf-analyzer PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench import loadgen  # noqa: E402
from tests.support.photos import jpeg, photo, photo_jpegs  # noqa: E402

MAX_BATCH = 64
BASE = 'arch = "vit_b_16"\nweights = "random"\nlabels = "imagenet"\n'
TINY = (
    'arch = "vit"\nweights = "random"\nlabels = "imagenet"\n[arch_params]\nimage_size = 224\npatch_size = 16\n'
    "num_layers = 2\nnum_heads = 2\nhidden_dim = 64\nmlp_dim = 128\n"
)


@dataclass(frozen=True)
class Config:
    name: str
    flags: list[str]
    levels: list[tuple[str, int]]  # (workload, concurrency)
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    mps: bool = False  # the workers share the GPU through a CUDA MPS daemon


NUMERICS = 2  # configs 0 and 1 (GPU decode, each backend) are kept up for the numerics against config 2 (CPU decode)


def configs(smoke: bool, quick: bool = False) -> list[Config]:
    """The GPU-decode servers first (torchvision, nvImageCodec), then the CPU-decode one, then several workers: the
    decode backends at 8 workers (the best of 2026-11-27) with and without MPS, and 2 larger processes."""
    if smoke:  # the script's own logic on a CPU: a tiny model, CPU decode on both sides
        cpu = ["--device", "cpu", "--decode-device", "cpu"]
        return [
            Config("cpu a", cpu, [("small", 1), ("photo", 4)]),
            Config("cpu b", cpu, [("small", 4)]),
            Config("cpu c", cpu, [("small", 4)]),
            Config("cpu, 2 workers, MPS", cpu, [("small", 4)], workers=2, mps=True),
        ]
    fast = ["--device", "cuda", "--dtype", "fp16", "--cuda-graphs"]
    tv = [*fast, "--decode-device", "cuda", "--decode-backend", "torchvision"]
    nv = [*fast, "--decode-device", "cuda", "--decode-backend", "nvimagecodec"]
    cpu = [*fast, "--decode-device", "cpu"]
    larger = [*nv, "--decode-workers", "8", "--pipeline-depth", "4"]  # 2 processes of 8 decode threads, 4 lanes
    photo = [("photo", 256)]
    if quick:  # a short device lease: the targets' rows, the numerics, the backends and MPS at 8 workers
        return [
            Config("fp16+graphs, decode cuda (torchvision)", tv, [("small", 1), ("photo", 64)]),
            Config("fp16+graphs, decode cuda (nvimagecodec)", nv, [("photo", 64)]),
            Config("fp16+graphs, decode cpu", cpu, [("photo", 64)]),
            Config("decode cuda (nvimagecodec), 8 workers", nv, photo, workers=8),
            Config("decode cuda (nvimagecodec), 8 workers, MPS", nv, photo, workers=8, mps=True),
        ]
    full = [("small", 1), ("small", 64), ("photo", 1), ("photo", 16), ("photo", 64), ("photo", 128)]
    return [
        Config("fp16+graphs, decode cuda (torchvision)", tv, full),
        Config("fp16+graphs, decode cuda (nvimagecodec)", nv, [("photo", 64), ("photo", 128)]),
        Config("fp16+graphs, decode cpu", cpu, [("photo", 64)]),
        Config("decode cuda (torchvision), 8 workers", tv, photo, workers=8),
        Config("decode cuda (nvimagecodec), 8 workers", nv, photo, workers=8),
        Config("decode cuda (torchvision), 8 workers, MPS", tv, photo, workers=8, mps=True),
        Config("decode cuda (nvimagecodec), 8 workers, MPS", nv, photo, workers=8, mps=True),
        Config("decode cuda (nvimagecodec), 2 workers x 8 decode threads, depth 4", larger, photo, workers=2),
    ]


@contextlib.contextmanager
def cuda_mps(wanted: bool) -> Iterator[tuple[str, dict[str, str]]]:
    """A CUDA MPS control daemon for one configuration, in temporary folders: (what happened, the servers' env).

    "off" when not wanted, "unavailable" without nvidia-cuda-mps-control, "on" when the daemon started (and is told
    to quit after), else "failed: ..." (the configuration then runs without it)."""
    binary = shutil.which("nvidia-cuda-mps-control")
    if not wanted or binary is None:
        yield ("off" if not wanted else "unavailable"), {}
        return
    with tempfile.TemporaryDirectory() as pipes, tempfile.TemporaryDirectory() as logs:
        env = {"CUDA_MPS_PIPE_DIRECTORY": pipes, "CUDA_MPS_LOG_DIRECTORY": logs}
        started = subprocess.run(
            [binary, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30, check=False
        )
        if started.returncode != 0:
            yield f"failed: exit {started.returncode} {started.stderr.strip()[:200]}", {}
            return
        try:
            yield "on", env
        finally:
            subprocess.run(
                [binary], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True, timeout=30
            )


def images() -> dict[str, bytes]:
    chelsea = photo("chelsea")
    return {"small": jpeg(chelsea), "photo": jpeg(chelsea, size=(1920, 1280))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def post(url: str, body: bytes, timeout: float = 60) -> dict[str, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


class Server:
    """A real vit-serve process on the GPU; its log goes to a file."""

    def __init__(self, config: Config, log_path: Path, repository: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "app.serve.cli",
            "serve",
            "--model-repository",
            str(repository),
            "--model",
            "vit_b_16",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--max-batch-size",
            str(MAX_BATCH),
            "--max-queue-delay-ms",
            "5",
            "--max-queue-size",
            "2048",
            "--log-level",
            "warning",
            "--workers",
            str(config.workers),
            *config.flags,
        ]
        self.workers = config.workers
        self.name = config.name
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "VIT_GRPC_PORT": "0"},  # HTTP only; MPS's folders where it runs
        )

    def wait_ready(self, timeout_s: float = 300) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            if get(f"{self.url}/readyz", timeout=2)[0] == 200 and self.workers_up() == self.workers:
                return time.monotonic() - started
            time.sleep(0.5)
        raise RuntimeError("server not ready in time")

    def workers_up(self) -> int:
        """Worker processes in the metrics (the port answers once the first is ready); 1 for a single process."""
        if self.workers == 1:
            return 1
        _, body = get(f"{self.url}/metrics")
        return body.decode(errors="replace").count("process_resident_memory_bytes{pid=")

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        _, body = get(f"{self.url}/metrics")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")) and sample.labels.get("model", "vit_b_16") == "vit_b_16":
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def where_time_went(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(metric: str, scale: float = 1.0) -> float | None:
        count = delta(f"{metric}_count")
        return round(delta(f"{metric}_sum") / count * scale, 3) if count else None

    return {
        "mean_batch": mean("vit_batch_size"),
        "prepare_ms_per_image": mean("vit_preprocess_seconds", 1000),
        "queue_wait_ms": mean("vit_queue_wait_seconds", 1000),
        "batch_ms": mean("vit_inference_seconds", 1000),
        "batches": delta("vit_batch_size_count"),
    }


def numerics(urls: dict[str, str]) -> dict[str, Any]:
    """The photographs through each server: top-1 agreement and the largest relative logit error against CPU decode."""
    logits = {
        name: np.array([post(f"{url}/v1/classify?top_k=1", data)["predictions"][0]["logits"] for data in photos])
        for name, url in urls.items()
        for photos in [list(photo_jpegs().values())]
    }
    reference = logits.pop("cpu")
    result: dict[str, Any] = {"photos": len(reference)}
    for name, values in logits.items():
        relative = np.abs(values - reference).max(axis=1) / np.abs(reference).max(axis=1)
        result[name] = {
            "top1_agreement": float((values.argmax(1) == reference.argmax(1)).mean()),
            "max_relative_error": float(relative.max()),
            "mean_relative_error": float(relative.mean()),
        }
    return result


def perf_analyzer(server: Server, binary: str, photo: bytes, out: Path) -> dict[str, Any]:
    """bench/perf_analyzer.sh against the server (random tensors, then the 1920x1280 JPEG) at concurrency 16 and 64."""
    image = out / "photo.jpg"
    image.write_bytes(photo)
    env = {**os.environ, "PERF_ANALYZER": binary, "PA_IMAGES": str(image), "PA_INTERVAL_MS": "1000"}
    command = ["bash", str(HERE / "perf_analyzer.sh"), f"127.0.0.1:{server.port}", "vit_b_16", "16:64:48"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        partial = [
            part.decode() if isinstance(part, bytes) else part or "" for part in (expired.stdout, expired.stderr)
        ]
        output, code = "".join(partial) + "\ntimed out", -1
    (out / "perf_analyzer.log").write_text(output)
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("Concurrency:")]
    print(f"perf_analyzer: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
    return {"exit": code, "lines": lines}


def settle(server: Server, config: Config, bodies: dict[str, bytes], args: argparse.Namespace) -> None:
    """Load a fresh server for a few seconds, unrecorded, at its first level: its first batches of each size (and
    every worker's) pay one-time costs that a level's own short warm-up does not always absorb."""
    workload, concurrency = config.levels[0]
    measure(server, config, workload, bodies[workload], concurrency, args, duration_s=args.settle, warmup_s=0.0)


def measure(
    server: Server,
    config: Config,
    workload: str,
    body: bytes,
    concurrency: int,
    args: argparse.Namespace,
    *,
    duration_s: float | None = None,
    warmup_s: float | None = None,
) -> dict[str, Any]:
    before = server.metrics()
    result = loadgen.run(
        f"{server.url}/v1/classify?top_k=5",
        body,
        "image/jpeg",
        concurrency,
        args.duration if duration_s is None else duration_s,
        args.warmup if warmup_s is None else warmup_s,
        procs=min(concurrency, 6),
    )
    row = {"config": config.name, "workload": workload, **result.as_dict(), **where_time_went(before, server.metrics())}
    row["images_per_s"] = row["rps"]  # one image a request
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of unrecorded load after each start")
    parser.add_argument("--perf-analyzer", help="perf_analyzer's binary: also run bench/perf_analyzer.sh, 16 and 64")
    parser.add_argument("--quick", action="store_true", help="the targets' rows and the numerics only (~1 minute)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script itself")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bodies = images()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "rows": rows, "max_batch_size": MAX_BATCH}
    import torch

    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report["torch"] = torch.__version__
    report["image_bytes"] = {name: len(body) for name, body in bodies.items()}
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as work:
        repository = Path(work) / "models"
        (repository / "vit_b_16").mkdir(parents=True)
        (repository / "vit_b_16" / "model.toml").write_text(TINY if args.smoke else BASE)
        try:
            for index, config in enumerate(configs(args.smoke, args.quick)):
                with cuda_mps(config.mps) as (mps, env):
                    report.setdefault("mps", {})[config.name] = mps
                    server = Server(config, args.out / f"server-{index}.log", repository, env)
                    servers.append(server)
                    run_config(server, config, bodies, args, rows, report, mps)
                    if index == 0 and args.perf_analyzer:
                        report["perf_analyzer"] = perf_analyzer(server, args.perf_analyzer, bodies["photo"], args.out)
                    if index == NUMERICS:  # the GPU-decode servers (kept up, idle) and the CPU-decode one
                        urls = {servers[n].name: servers[n].url for n in range(NUMERICS)}
                        report["numerics"] = numerics({**urls, "cpu": server.url})
                        print(json.dumps(report["numerics"]), flush=True)
                    if index >= NUMERICS:  # before MPS's daemon quits: its clients first
                        for done in servers:
                            if done.process.poll() is None:
                                done.stop()
        finally:
            for server in servers:
                if server.process.poll() is None:
                    server.stop()
    save(args.out, report)


def run_config(
    server: Server,
    config: Config,
    bodies: dict[str, bytes],
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    report: dict[str, Any],
    mps: str,
) -> None:
    ready_s = server.wait_ready()
    print(f"== {config.name}: ready in {ready_s:.1f} s (MPS: {mps})", flush=True)
    settle(server, config, bodies, args)
    for workload, concurrency in config.levels:
        rows.append({**measure(server, config, workload, bodies[workload], concurrency, args), "mps": mps})
        print(json.dumps(rows[-1]), flush=True)
        save(args.out, report)  # as it goes: a run cut short keeps what it measured


def save(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_serve.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
