"""Where the cores go while wrk loads the service on `make bench`'s workload: the server's processes (and each of its
threads, named by py-spy), wrk itself, and how busy the whole machine was, from /proc over a 10 s window.

    .venv/bin/python bench/cpu_share.py [--workload small|photo] [--concurrency 16] [--flags --workers 2]

Linux only. A core's worth of CPU is 100 %; the machine's share is of all its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.run import free_port, stop, wait_answering  # noqa: E402
from bench.workload import write  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
WINDOW_S = 10


def cpu_seconds(stat: Path) -> float:
    """user + system time of a process or thread from its /proc stat file (0 once it is gone)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [pid]
    if children.exists():
        for child in children.read_text().split():
            found += descendants(int(child))
    return found


def thread_times(pids: list[int]) -> dict[tuple[int, int], float]:
    times = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            times[(pid, int(task.name))] = cpu_seconds(task / "stat")
    return times


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def thread_names(pids: list[int]) -> dict[int, str]:
    """OS thread id -> Python thread name, from `py-spy dump` (empty without py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    names = {}
    for pid in pids:
        if not Path(spy).exists():
            break
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, check=False).stdout
        for line in dump.splitlines():  # Thread 10987 (active): "decode_0"
            if line.startswith("Thread ") and '"' in line:
                names[int(line.split()[1], 0)] = line.split('"')[1]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("small", "photo"), default="small")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="serve flags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        body = write(work)[args.workload]
        port = free_port()
        command = [sys.executable, "-m", "app.serve.cli", "serve", "--model-repository", str(work / "models")]
        command += ["--model", "mtiny", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        server = subprocess.Popen(
            [*command, *args.flags],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VIT_GRPC_PORT": "0"},  # HTTP only
        )
        url = f"http://127.0.0.1:{port}/v1/classify?logits=false"
        try:
            wait_answering(url, body.read_bytes(), server)
            env = {**os.environ, "BODY_FILE": str(body)}
            load = ["wrk", "-t1", f"-c{args.concurrency}", "-s", str(HERE / "post_file.lua"), url]
            subprocess.run([*load, "-d4s"], env=env, capture_output=True, check=True)  # warm-up
            wrk = subprocess.Popen([*load, f"-d{WINDOW_S + 4}s"], env=env, stdout=subprocess.PIPE, text=True)
            time.sleep(2)
            pids = descendants(server.pid)
            names = thread_names(pids)
            before, wrk_before, machine_before = (
                thread_times(pids),
                cpu_seconds(Path(f"/proc/{wrk.pid}/stat")),
                machine_busy(),
            )
            started = time.perf_counter()
            time.sleep(WINDOW_S)
            after, wrk_after, machine_after = (
                thread_times(pids),
                cpu_seconds(Path(f"/proc/{wrk.pid}/stat")),
                machine_busy(),
            )
            wall = time.perf_counter() - started
            output = wrk.communicate()[0]
        finally:
            stop(server)
    result = json.loads(next(line for line in output.splitlines() if line.startswith("WRKJSON "))[8:])
    rate = result["requests"] / (result["duration_us"] / 1e6)
    shares = {key: (after[key] - before.get(key, 0.0)) / wall for key in after}
    busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
    print(f"M-tiny W-{args.workload} c={args.concurrency} {' '.join(args.flags) or '(one process)'}: {rate:.1f} req/s")
    print(
        f"server {100 * sum(shares.values()):.1f} %, wrk {100 * (wrk_after - wrk_before) / wall:.1f} %, "
        f"machine busy {100 * busy:.1f} % of {os.cpu_count()} cores"
    )
    for (pid, tid), share in sorted(shares.items(), key=lambda item: -item[1]):
        if share >= 0.01:
            print(f"  pid {pid} thread {tid:>7d} {names.get(tid, '(native)'):22s} {100 * share:5.1f} %")


if __name__ == "__main__":
    main()
