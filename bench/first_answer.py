"""Time to first answer: the README's path for a newcomer, a fresh clone -> `make run` -> the first classification.

Clones a git revision into a temporary folder (the network is not needed beyond the package registry: pip takes
what it can from its cache, as on a newcomer's second try, unless `--cold`), runs `VIT_WEIGHTS=random make run`
there and times each part separately:

- install: from `make run`'s start until its install stamp exists (the venv created and the project installed);
- start: from then until the port answers `/healthz` (interpreter, torch and the model loaded);
- warm-up: from then until `/readyz` says 200;
- first answer: one real photograph classified with the README's curl request (`/v1/classify?top_k=3`).

It also records the venv's size on disk and the largest packages in it.

    .venv/bin/python bench/first_answer.py [--revision HEAD] [--cold] [--keep]

Prints a Markdown report; the caller records it under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.run import free_port  # noqa: E402

STAMP = ".venv/.installed-run"
LIMIT_S = 3600


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def photograph() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def largest_packages(venv: Path, count: int = 6) -> list[tuple[str, int]]:
    site = next(venv.glob("lib/python*/site-packages"))
    sizes = [(p.name, folder_size(p)) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")]
    return sorted(sizes, key=lambda item: -item[1])[:count]


def wait_for(condition: str, check: object, process: subprocess.Popen[bytes], started: float) -> float:
    """Seconds from `started` until `check()` is true; fails if the process exits or the limit passes."""
    assert callable(check)
    while time.monotonic() - started < LIMIT_S:
        if process.poll() is not None:
            raise SystemExit(f"`make run` exited ({process.returncode}) before {condition}")
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit(f"no {condition} within {LIMIT_S} s")


def status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revision", default="HEAD", help="the git revision to clone (default HEAD)")
    parser.add_argument("--keep", action="store_true", help="keep the clone (and its venv) afterwards")
    parser.add_argument("--cold", action="store_true", help="pip without its cache (PIP_NO_CACHE_DIR): a new machine")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vit-first-answer-"))
    clone = work / "vit-serve"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", args.revision], check=True)
    commit = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VIT_WEIGHTS": "random", "VIT_PORT": str(port), "VIT_HOST": "127.0.0.1"}
    env.pop("VIRTUAL_ENV", None)
    if args.cold:
        env["PIP_NO_CACHE_DIR"] = "1"
    log = (work / "make-run.log").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(
        ["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        installed = wait_for("the install", lambda: (clone / STAMP).exists(), process, started)
        answering = wait_for("/healthz", lambda: status(f"{base}/healthz") == 200, process, started)
        ready = wait_for("/readyz 200", lambda: status(f"{base}/readyz") == 200, process, started)
        response = httpx.post(
            f"{base}/v1/classify?top_k=3", content=photograph(), headers={"Content-Type": "image/jpeg"}, timeout=60
        )
        answered = time.monotonic() - started
        if response.status_code != 200:
            raise SystemExit(f"the first classification answered {response.status_code}: {response.text}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
        log.close()
    venv = clone / ".venv"
    size = folder_size(venv)
    packages = largest_packages(venv)
    today = datetime.date.today().isoformat()
    print(f"# Time to first answer, {today}, {cpu_name()} ({os.cpu_count()} cores), revision {commit}\n")
    cache = "without pip's cache" if args.cold else "pip's cache warm, as on a second try"
    print(f"`VIT_WEIGHTS=random make run` in a fresh clone ({cache}); seconds since `make run` started.\n")
    print("| part | seconds | since start |\n|---|---:|---:|")
    print(f"| install (venv and project) | {installed:.1f} | {installed:.1f} |")
    print(f"| start (port answers /healthz) | {answering - installed:.1f} | {answering:.1f} |")
    print(f"| warm-up (/readyz 200) | {ready - answering:.1f} | {ready:.1f} |")
    print(f"| first classification (photograph, top 3) | {answered - ready:.1f} | {answered:.1f} |")
    print(
        f"\nvenv: {size / 2**30:.2f} GiB; largest packages: "
        + ", ".join(f"{name} {bytes_ / 2**20:.0f} MiB" for name, bytes_ in packages)
    )
    if args.keep:
        print(f"\nkept: {clone}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
