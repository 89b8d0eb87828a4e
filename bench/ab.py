"""A/B of two versions of the service on `make bench`'s workload, in alternating rounds in one sitting.

The machine's noise (this 2-core host drifts by 10-30 % between minutes) is larger than most single changes, so each
round runs both versions back to back, in alternating order (A B, B A, ...), and the table reports every round and
the mean ratio. "before" is a git revision checked out into a temporary worktree; "after" is this working tree.

    .venv/bin/python bench/ab.py --before HEAD~1 --rounds 4 --levels 1,4,16 [--workload small] [--flags ...]

Prints a Markdown table; the caller records it under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.run import drain, free_port, machine, post, stop, wait_answering, wrk  # noqa: E402
from bench.workload import write  # noqa: E402


def measure(
    tree: Path, work: Path, body: Path, levels: list[int], seconds: int, flags: list[str]
) -> dict[int, dict[str, float]]:
    """One version at every level: (req/s, p50 ms) after a warm-up and a drain, like `make bench`."""
    port = free_port()
    entry = "app.serve.cli" if (tree / "app" / "serve" / "cli.py").exists() else "app.cli"  # before the layers
    command = [sys.executable, "-m", entry, "serve", "--model-repository", str(work / "models")]
    command += ["--model", "mtiny", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *flags]
    process = subprocess.Popen(
        command,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "VIT_GRPC_PORT": "0"},  # HTTP only (a variable: an older tree has no --grpc-port)
    )
    url = f"http://127.0.0.1:{port}/v1/classify?logits=false"
    data = body.read_bytes()
    found = {}
    try:
        wait_answering(url, data, process)
        idle_s = min(post(url, data) for _ in range(5))
        for connections in levels:
            wrk(url, body, connections, 3)
            drain(url, data, idle_s)
            result = wrk(url, body, connections, seconds)
            found[connections] = {
                "rps": result["requests"] / (result["duration_us"] / 1e6),
                "p50_ms": result["p50_us"] / 1000,
            }
    finally:
        stop(process)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--workload", choices=("small", "photo"), default="small")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="serve flags for both versions")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory() as temporary:
        work, before = Path(temporary) / "work", Path(temporary) / "before"
        bodies = write(work)
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(before), revision], cwd=ROOT, check=True)
        try:
            trees = {"before": before, "after": ROOT}
            rounds = []
            for number in range(args.rounds):
                order = ["before", "after"] if number % 2 == 0 else ["after", "before"]
                found = {
                    name: measure(trees[name], work, bodies[args.workload], levels, args.seconds, args.flags)
                    for name in order
                }
                rounds.append(found)
                for name in order:
                    cells = ", ".join(
                        f"c={c} {v['rps']:.1f} req/s p50 {v['p50_ms']:.2f} ms" for c, v in found[name].items()
                    )
                    print(f"round {number} {name:6s} {cells}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    where = machine()
    print(
        f"A/B on {where['cpu']} ({where['cores']} cores), {started:%Y-%m-%d %H:%M} UTC: before = {revision}, "
        f"after = the working tree; M-tiny, W-{args.workload}, {args.seconds} s windows, flags {args.flags or 'none'}"
    )
    print()
    print("| concurrency | round | before req/s (p50 ms) | after req/s (p50 ms) | after / before |")
    print("|---|---|---|---|---|")
    for connections in levels:
        ratios = []
        for number, found in enumerate(rounds):
            a, b = found["before"][connections], found["after"][connections]
            ratios.append(b["rps"] / a["rps"])
            print(
                f"| {connections} | {number} | {a['rps']:.1f} ({a['p50_ms']:.2f}) | {b['rps']:.1f} ({b['p50_ms']:.2f}) "
                f"| {ratios[-1]:.2f} |"
            )
        print(f"| {connections} | mean | | | **{statistics.mean(ratios):.2f}** |")


if __name__ == "__main__":
    main()
