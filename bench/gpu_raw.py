"""Raw model throughput of ViT-B/16 on one GPU: the ceiling a serving benchmark is compared against.

Plain torch, nothing from app/. The model only: weights cast once (``model.to(device, dtype)``), inputs are fresh
random normal tensors already on the device in the model's dtype, ``torch.inference_mode()``; no decoding, no copies,
no batching queue.

The matrix is dtype (fp32, fp16, bf16) x mode x batch size (1 .. 256 by default):

- ``eager``: ``model(x)``.
- ``compiled``: ``torch.compile(model, dynamic=False)`` in the default mode. Every batch size is compiled (warmed
  up) first and timed after, so compilation is never timed; ``dynamic=False`` gives each batch size its own static
  specialisation (otherwise the second shape turns on dynamic shapes and later cells would time a different,
  shape-generic program), and the recompile limit is raised so that all of them fit.
- ``graphs``: one CUDA graph captured per batch size over a static input buffer (warm-up iterations on a side
  stream, then capture, as the PyTorch docs show); the timing replays it. CUDA only.

Timing: a few warm-up iterations, then an estimate of the per-iteration time that sizes the measurement (about
``--target-cell-s`` per cell), then several repeats of K iterations, timed with CUDA events (``perf_counter`` on
CPU); the median per-iteration time gives ms per batch and images/s = batch / median.

``--budget-s`` bounds the whole run: the (dtype, mode) groups run in a priority order (fp16 eager, fp16 graphs,
bf16 eager, bf16 graphs, fp32 eager, fp32 graphs, then the compiled ones), and a cell that would start past the
budget is recorded as skipped ("budget"); a compiled cell starts with its compile, which must also leave time to
time it. A cell that fails (out of memory, a compile error) records the error and the run goes on.

Numerical check, per (dtype, mode): a fixed, seeded batch of 8 random inputs through that dtype/mode, compared with
the fp32 eager logits: max relative error = max|a - ref| / max|ref|, and the fraction of rows whose top-1 class
agrees.

fp32 is true fp32 unless ``--tf32`` (which allows TF32 in cuBLAS matmuls and cuDNN convolutions; both are turned
off explicitly otherwise, since cuDNN allows TF32 by default).

There are no pretrained weights (the target host has no network): ``vit_b_16(weights=None)`` after
``torch.manual_seed(0)``. torchvision initialises the classification head to zeros, which would make every logit
0 and the numerical check meaningless, so the head is re-initialised from a seeded normal (std 0.02); the cost of
the model is unchanged.

    python bench/gpu_raw.py [--out DIR] [--budget-s 150] [--dtypes fp16,bf16,fp32] [--modes eager,graphs,compiled]
                            [--batch-sizes 1,2,4,...,256] [--model base|tiny] [--device cuda|cpu] [--no-compile]
                            [--tf32] [--target-cell-s 0.35]

Writes DIR/gpu_raw.json (device, versions, date, config, every cell and check) and prints a table of images/s.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("eager", "compiled", "graphs")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The order the (dtype, mode) groups run in, so that a budget cut drops the least important ones.
PRIORITY: tuple[tuple[str, str], ...] = (
    ("fp16", "eager"),
    ("fp16", "graphs"),
    ("bf16", "eager"),
    ("bf16", "graphs"),
    ("fp32", "eager"),
    ("fp32", "graphs"),
    ("fp16", "compiled"),
    ("bf16", "compiled"),
    ("fp32", "compiled"),
)
IMAGE_SHAPE = (3, 224, 224)
CHECK_BATCH = 8
CHECK_SEED = 1234
INPUT_SEED = 0
WARMUP_ITERS = 3
GRAPH_WARMUP_ITERS = 3
REPEATS = 5
MIN_REPEATS = 3
TIMING_RESERVE = 2.0  # seconds kept back per compiled cell, in units of --target-cell-s, for its timing
ESTIMATE_S = 0.02
MAX_ERROR_CHARS = 500

Step = Callable[[], object]
# torch's Event and Stream constructors are untyped; these typed aliases keep `mypy --strict` quiet on every version.
new_event: Callable[..., torch.cuda.Event] = torch.cuda.Event
new_stream: Callable[..., torch.cuda.Stream] = torch.cuda.Stream


@dataclass
class Cell:
    dtype: str
    mode: str
    batch_size: int
    status: str = "pending"  # "ok" | "skipped" | "error"
    reason: str | None = None  # why skipped
    error: str | None = None
    images_per_s: float | None = None
    ms_per_batch: float | None = None  # median over the repeats
    ms_per_batch_min: float | None = None
    ms_per_batch_max: float | None = None
    repeats: int | None = None
    iters_per_repeat: int | None = None
    repeat_ms: list[float] = field(default_factory=list)
    setup_s: float | None = None  # compile (warm-up) or graph capture time, never part of the timing
    cell_s: float | None = None  # wall time of the whole cell, setup included


@dataclass
class Check:
    dtype: str
    mode: str
    status: str = "pending"  # "ok" | "skipped" | "error"
    reason: str | None = None
    error: str | None = None
    batch: int = CHECK_BATCH
    max_rel_err: float | None = None  # None when not finite
    max_abs_err: float | None = None
    top1_agreement: float | None = None
    all_finite: bool | None = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="directory for gpu_raw.json")
    parser.add_argument("--budget-s", type=float, default=150.0, help="no cell starts after this many seconds")
    parser.add_argument("--model", choices=("base", "tiny"), default="base", help="ViT-B/16, or a 2-layer smoke model")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), help="comma-separated")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated subset of fp32,fp16,bf16")
    parser.add_argument("--modes", default="eager,graphs,compiled", help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cells")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls/convolutions (default off)")
    parser.add_argument("--target-cell-s", type=float, default=0.35, help="measured seconds per cell (about)")
    args = parser.parse_args(argv)
    args.batch_sizes = _int_list(parser, args.batch_sizes)
    args.dtypes = _choice_list(parser, args.dtypes, tuple(DTYPES), "--dtypes")
    args.modes = _choice_list(parser, args.modes, MODES, "--modes")
    if args.budget_s < 0 or args.target_cell_s <= 0:
        parser.error("--budget-s must be >= 0 and --target-cell-s > 0")
    return args


def _int_list(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--batch-sizes: not a list of integers: {text!r}")
    if not values or any(value < 1 for value in values):
        parser.error(f"--batch-sizes: need positive integers: {text!r}")
    return sorted(set(values))


def _choice_list(parser: argparse.ArgumentParser, text: str, allowed: Sequence[str], flag: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        parser.error(f"{flag}: {text!r}; choose from {','.join(allowed)}")
    return values


def build_model(name: str) -> nn.Module:
    """The fp32 model on the CPU, seeded; the zero-initialised head gets a seeded normal init (see the docstring)."""
    torch.manual_seed(0)
    model: nn.Module
    if name == "base":
        model = vit_b_16(weights=None)
    else:
        model = VisionTransformer(
            image_size=224, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=1000
        )
    head = model.get_submodule("heads.head")
    assert isinstance(head, nn.Linear)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
        head.bias.zero_()
    model.eval()
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Step, iters: int, device: torch.device) -> float:
    """Seconds for `iters` back-to-back calls of `step`, device work included."""
    if device.type == "cuda":
        start = new_event(enable_timing=True)
        end = new_event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0
    started = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - started


def time_step(step: Step, device: torch.device, target_s: float, cell: Cell) -> None:
    """Warm up, size the measurement from an estimate, time REPEATS x K iterations; fills in the cell's numbers."""
    for _ in range(WARMUP_ITERS):
        step()
    synchronize(device)
    iters = 1
    while True:  # the estimate: double until a measurement is long enough to trust
        elapsed = measure(step, iters, device)
        if elapsed >= ESTIMATE_S or iters >= 1 << 16:
            break
        iters *= 2
    per_iter = max(elapsed / iters, 1e-9)
    repeats = REPEATS if per_iter * REPEATS <= target_s else max(MIN_REPEATS, int(target_s / per_iter))
    k = max(1, round(target_s / (repeats * per_iter)))
    per_iter_s = [measure(step, k, device) / k for _ in range(repeats)]
    median = statistics.median(per_iter_s)
    cell.repeats, cell.iters_per_repeat = repeats, k
    cell.repeat_ms = [round(t * 1000.0, 4) for t in per_iter_s]
    cell.ms_per_batch = median * 1000.0
    cell.ms_per_batch_min = min(per_iter_s) * 1000.0
    cell.ms_per_batch_max = max(per_iter_s) * 1000.0
    cell.images_per_s = cell.batch_size / median


def random_input(batch: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((batch, *IMAGE_SHAPE), generator=generator, device=device, dtype=dtype)


def capture_graph(model: nn.Module, static_input: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm up on a side stream, then capture one forward pass over `static_input` (the PyTorch docs' recipe)."""
    side = new_stream(device=static_input.device)
    side.wait_stream(torch.cuda.current_stream(static_input.device))
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_ITERS):
            model(static_input)
    torch.cuda.current_stream(static_input.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = model(static_input)
    assert isinstance(static_output, torch.Tensor)
    return graph, static_output


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def compare(logits: torch.Tensor, reference: torch.Tensor, check: Check) -> None:
    a = logits.detach().double().cpu()
    ref = reference.detach().double().cpu()
    check.all_finite = bool(torch.isfinite(a).all())
    abs_err = float((a - ref).abs().max())
    scale = float(ref.abs().max())
    rel_err = abs_err / scale if scale > 0 else math.inf
    check.max_abs_err = abs_err if math.isfinite(abs_err) else None
    check.max_rel_err = rel_err if math.isfinite(rel_err) else None
    check.top1_agreement = float((a.argmax(dim=1) == ref.argmax(dim=1)).double().mean())
    check.status = "ok"


def raise_recompile_limits() -> None:
    import torch._dynamo.config as dynamo_config

    # One static specialisation per batch size and dtype: more than the default limit of 8.
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024)):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, value)


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.started = time.monotonic()
        self.deadline = self.started + float(args.budget_s)
        self.base = build_model(args.model)
        self.models: dict[str, nn.Module] = {}
        self.compiled: dict[str, Callable[..., Any]] = {}
        self.compile_s: list[float] = []  # every compile (warm-up) so far, to predict the next one
        self.cells: list[Cell] = []
        self.checks: list[Check] = []
        self.check_input = torch.randn(
            (CHECK_BATCH, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(CHECK_SEED)
        ).to(self.device)
        with torch.inference_mode():
            self.reference = self.model("fp32")(self.check_input).float().cpu()

    def over_budget(self, reserve_s: float = 0.0) -> bool:
        return time.monotonic() + reserve_s >= self.deadline

    def model(self, dtype: str) -> nn.Module:
        """The model cast once per dtype (`model.to(device, dtype)`), kept for the run."""
        if dtype not in self.models:
            self.models[dtype] = copy.deepcopy(self.base).to(self.device, DTYPES[dtype])
        return self.models[dtype]

    def compiled_model(self, dtype: str) -> Callable[..., Any]:
        if dtype not in self.compiled:
            self.compiled[dtype] = torch.compile(self.model(dtype), dynamic=False)
        return self.compiled[dtype]

    def skip_reason(self, mode: str) -> str | None:
        if mode == "graphs" and self.device.type != "cuda":
            return "needs CUDA"
        if mode == "compiled" and self.args.no_compile:
            return "disabled (--no-compile)"
        return None

    def run(self) -> None:
        groups = [(d, m) for d, m in PRIORITY if d in self.args.dtypes and m in self.args.modes]
        for dtype, mode in groups:
            cells = [Cell(dtype, mode, bs) for bs in self.args.batch_sizes]
            self.cells.extend(cells)
            check = Check(dtype, mode)
            self.checks.append(check)
            reason = self.skip_reason(mode)
            if reason is not None:
                for cell in cells:
                    cell.status, cell.reason = "skipped", reason
                check.status, check.reason = "skipped", reason
                continue
            log(f"{dtype}/{mode}")
            with torch.inference_mode():
                if mode == "compiled":
                    self.run_compiled(dtype, cells, check)
                else:
                    self.run_check(check)
                    for cell in cells:
                        self.run_cell(cell, functools.partial(self.prepare, cell))
            if mode == "compiled":
                self.compiled.pop(dtype, None)
                torch._dynamo.reset()
                free_memory(self.device)

    def run_check(self, check: Check, reserve_s: float = 0.0) -> None:
        if self.over_budget(reserve_s):
            check.status, check.reason = "skipped", "budget"
            return
        dtype = DTYPES[check.dtype]
        try:
            x = self.check_input.to(dtype)
            if check.mode == "eager":
                logits = self.model(check.dtype)(x)
            elif check.mode == "compiled":
                logits = self.compiled_model(check.dtype)(x)
            else:
                graph, static_output = capture_graph(self.model(check.dtype), x)
                graph.replay()
                logits = static_output.clone()
                del graph, static_output
            compare(logits.float(), self.reference, check)
        except Exception as exc:
            check.status, check.error = "error", error_text(exc)
        finally:
            free_memory(self.device)

    def prepare(self, cell: Cell) -> Step:
        """The step to time for an eager or graphs cell; graph capture happens here, outside the timing."""
        model = self.model(cell.dtype)
        x = random_input(cell.batch_size, DTYPES[cell.dtype], self.device, INPUT_SEED + cell.batch_size)
        if cell.mode == "eager":
            return lambda: model(x)
        graph, static_output = capture_graph(model, x)

        def replay() -> torch.Tensor:
            graph.replay()
            return static_output  # keeps the graph's output buffer alive as long as the step

        return replay

    def run_cell(self, cell: Cell, prepare: Callable[[], Step]) -> None:
        if self.over_budget():
            cell.status, cell.reason = "skipped", "budget"
            return
        started = time.monotonic()
        try:
            step = prepare()
            if cell.setup_s is None:  # compiled cells carry their compile time already
                cell.setup_s = time.monotonic() - started
            time_step(step, self.device, self.args.target_cell_s, cell)
            cell.status = "ok"
            del step
        except Exception as exc:
            cell.status, cell.error = "error", error_text(exc)
        finally:
            cell.cell_s = time.monotonic() - started
            free_memory(self.device)
        log(f"  {cell.dtype}/{cell.mode} bs={cell.batch_size}: {cell_text(cell)}")

    def run_compiled(self, dtype: str, cells: list[Cell], check: Check) -> None:
        """Compile (warm up) every batch size first, then check, then time: compilation is never timed.

        A compile starts only if the budget still leaves time for it (the median of the compiles so far) and to time
        it and those compiled before it (about TIMING_RESERVE x --target-cell-s each), so that compile work is not
        thrown away at the deadline.
        """
        inputs: dict[int, torch.Tensor] = {}
        reserve_per_cell = TIMING_RESERVE * self.args.target_cell_s
        for cell in cells:
            expected_compile_s = statistics.median(self.compile_s) if self.compile_s else 0.0
            if self.over_budget(expected_compile_s + reserve_per_cell * (len(inputs) + 1)):
                cell.status, cell.reason = "skipped", "budget"
                continue
            started = time.monotonic()
            try:
                x = random_input(cell.batch_size, DTYPES[dtype], self.device, INPUT_SEED + cell.batch_size)
                self.compiled_model(dtype)(x)
                synchronize(self.device)
                inputs[cell.batch_size] = x
            except Exception as exc:
                cell.status, cell.error = "error", error_text(exc)
                free_memory(self.device)
            cell.setup_s = time.monotonic() - started
            self.compile_s.append(cell.setup_s)
            log(f"  {dtype}/compiled bs={cell.batch_size}: compiled in {cell.setup_s:.1f} s")
        if CHECK_BATCH in inputs:  # already compiled for the check's shape: the check costs one forward pass
            self.run_check(check)
        else:
            expected_compile_s = statistics.median(self.compile_s) if self.compile_s else 0.0
            self.run_check(check, expected_compile_s + reserve_per_cell * len(inputs))
        for cell in cells:
            warm = inputs.get(cell.batch_size)
            if cell.status == "pending" and warm is not None:
                self.run_cell(cell, functools.partial(compiled_step, self.compiled_model(dtype), warm))


def compiled_step(compiled: Callable[..., Any], x: torch.Tensor) -> Step:
    return lambda: compiled(x)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cell_text(cell: Cell) -> str:
    if cell.status == "ok" and cell.images_per_s is not None and cell.ms_per_batch is not None:
        return f"{cell.images_per_s:.1f} images/s, {cell.ms_per_batch:.3f} ms/batch"
    return f"{cell.status}: {cell.reason or cell.error}"


def table(cells: Sequence[Cell], checks: Sequence[Check], batch_sizes: Sequence[int]) -> str:
    """Rows dtype/mode, columns batch sizes, images/s; then the numerical check and ms per batch at the largest."""
    by_key = {(c.dtype, c.mode, c.batch_size): c for c in cells}
    check_by_key = {(c.dtype, c.mode): c for c in checks}
    rows = [(d, m) for d in DTYPES for m in MODES if any((d, m, bs) in by_key for bs in batch_sizes)]
    header = ["images/s", *[f"bs{bs}" for bs in batch_sizes], "rel.err", "top1"]
    lines = [header]
    for dtype, mode in rows:
        line = [f"{dtype}/{mode}"]
        for bs in batch_sizes:
            cell = by_key.get((dtype, mode, bs))
            if cell is None:
                line.append("")
            elif cell.status == "ok" and cell.images_per_s is not None:
                line.append(f"{cell.images_per_s:.0f}" if cell.images_per_s >= 100 else f"{cell.images_per_s:.1f}")
            else:
                line.append("skip" if cell.status == "skipped" else "ERR")
        check = check_by_key.get((dtype, mode))
        if check is not None and check.status == "ok":
            line.append("nan/inf" if check.max_rel_err is None else f"{check.max_rel_err:.1e}")
            line.append(f"{check.top1_agreement:.2f}")
        else:
            line.extend(["-", "-"])
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(
            value.ljust(w) if i == 0 else value.rjust(w) for i, (value, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    notes = sorted({f"{c.dtype}/{c.mode}: {c.reason or c.error}" for c in cells if c.status in ("skipped", "error")})
    return "\n".join(text + (["", *notes] if notes else []))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available; use --device cpu")
        return 2
    set_tf32(args.tf32)
    if "compiled" in args.modes and not args.no_compile:
        raise_recompile_limits()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    bench = Bench(args)
    bench.run()
    result: dict[str, Any] = {
        "benchmark": "gpu_raw",
        "date": date,
        "device": {"type": device.type, "name": device_name(device)},
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "config": {
            "model": "vit_b_16" if args.model == "base" else "tiny",
            "batch_sizes": args.batch_sizes,
            "dtypes": args.dtypes,
            "modes": args.modes,
            "priority": [f"{d}/{m}" for d, m in PRIORITY],
            "budget_s": args.budget_s,
            "target_cell_s": args.target_cell_s,
            "tf32": args.tf32,
            "compile": {"enabled": not args.no_compile, "mode": "default", "dynamic": False},
            "image_shape": list(IMAGE_SHAPE),
            "check": {"batch": CHECK_BATCH, "seed": CHECK_SEED, "reference": "fp32/eager"},
        },
        "elapsed_s": round(time.monotonic() - bench.started, 3),
        "cells": [asdict(cell) for cell in bench.cells],
        "checks": [asdict(check) for check in bench.checks],
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "gpu_raw.json"
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        log(f"wrote {path}")
    print(f"{result['device']['name']}, torch {torch.__version__}, {result['config']['model']}, {date}")
    print(table(bench.cells, bench.checks, args.batch_sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
