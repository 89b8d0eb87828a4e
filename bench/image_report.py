"""The container image measured: size, layers, what the CUDA libraries take of it, the time from start to ready, and
`pip list` (an SBOM-lite), for one or more images already built (`make image`).

Each image is started `--runs` times with `buildah run` (chroot isolation, the host's network), its own command
(`vit-serve serve`) with `VIT_WEIGHTS=random`: the default model, vit_b_16, with seeded random weights, so no weights
need to be baked in or downloaded. Timed from the start of `buildah run` until the port answers (`/healthz`), until
`/readyz` says 200, and until the first classification of a photograph has come back; then stopped with SIGTERM.

    .venv/bin/python bench/image_report.py [--runs 3] TAG [TAG ...]

Prints a Markdown report; the caller records it under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import container_image  # noqa: E402
from tests.support.photos import jpeg, photo  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

SITE_PACKAGES = "opt/venv/lib/python3.11/site-packages"
MiB = 2**20


def first_200(url: str, process: subprocess.Popen[bytes], timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s} s")


def time_to_ready(tag: str) -> tuple[float, float, float]:
    """Seconds from `buildah run` to the port answering, to ready, and to the first answer."""
    port = free_port()
    env = {"VIT_PORT": str(port), "VIT_HOST": "127.0.0.1", "VIT_WEIGHTS": "random"}
    config = container_image.image_config(tag)
    body = jpeg(photo("chelsea"))
    url = f"http://127.0.0.1:{port}"
    with container_image.container(tag) as name, tempfile.TemporaryFile() as log:
        command = container_image.run_command(name, [*config["Entrypoint"], *config["Cmd"]], env, {})
        started = time.monotonic()
        runner = subprocess.Popen(command, stdout=log, stderr=log)
        server = container_image.started_command(runner)
        try:
            answering = first_200(f"{url}/healthz", runner)
            ready = first_200(f"{url}/readyz", runner)
            response = httpx.post(
                f"{url}/v1/classify", content=body, headers={"Content-Type": "image/jpeg"}, timeout=60
            )
            response.raise_for_status()
            answered = time.monotonic()
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            if runner.poll() is None:
                os.kill(server, signal.SIGTERM)
            runner.wait(timeout=60)
    return answering - started, ready - started, answered - started


def folder_size(path: Path) -> int:
    return sum(entry.lstat().st_size for entry in path.rglob("*") if entry.is_file() and not entry.is_symlink())


def package_groups(tag: str) -> dict[str, int]:
    """Bytes in the environment's site-packages: the CUDA libraries (nvidia, cuda), triton, torch, the rest."""
    groups: dict[str, int] = defaultdict(int)
    with container_image.container(tag) as name:
        site = container_image.mountpoint(name) / SITE_PACKAGES
        for entry in site.iterdir():
            size = folder_size(entry) if entry.is_dir() else entry.stat().st_size
            lowered = entry.name.lower()
            if lowered.startswith(("nvidia", "cuda")):
                groups["CUDA libraries (nvidia-*, cuda-*)"] += size
            elif lowered.startswith("triton"):
                groups["triton"] += size
            elif lowered.startswith("torch") and not lowered.startswith("torchvision"):
                groups["torch"] += size
            else:
                groups["everything else"] += size
    return dict(groups)


def pip_list(tag: str) -> str:
    with container_image.container(tag) as name:
        return container_image.run_in(name, ["pip", "list", "--format", "freeze"]).stdout


def report(tag: str, runs: int) -> str:
    layers = container_image.layers(tag)
    lines = [f"## `{tag}`", "", f"Size: {sum(layer.size for layer in layers) / MiB:,.1f} MiB (uncompressed layers)", ""]
    lines += ["| layer (oldest first) | MiB |", "|---|---:|"]
    for layer in reversed(layers):
        if layer.size:
            instruction = " ".join(layer.created_by.replace("/bin/sh -c #(nop) ", "").split())[:110]
            escaped = instruction.replace("|", "\\|")  # a table cell
            lines.append(f"| `{escaped}` | {layer.size / MiB:,.1f} |")
    lines += ["", "| in /opt/venv's site-packages | MiB |", "|---|---:|"]
    for group, size in sorted(package_groups(tag).items(), key=lambda item: -item[1]):
        lines.append(f"| {group} | {size / MiB:,.1f} |")
    lines += ["", "| run | port answers (s) | ready (s) | first answer (s) |", "|---:|---:|---:|---:|"]
    for run in range(1, runs + 1):
        answering, ready, answered = time_to_ready(tag)
        lines.append(f"| {run} | {answering:.1f} | {ready:.1f} | {answered:.1f} |")
    lines += ["", "<details><summary>pip list</summary>", "", "```", pip_list(tag).strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tags", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("\n".join(report(tag, args.runs) for tag in args.tags))


if __name__ == "__main__":
    main()
