"""The accuracy gate: whether a fast path computes the same answers as the exact one, measured at start.

A model served on any fast path (a backend other than torch, int8, fp16/bf16, torch.compile, `jpeg_draft`, JPEGs
decoded on the GPU) is compared, in its warm-up, with the exact path: the same images decoded on the CPU at full
scale and run through the torch module in fp32. The images are the model folder's `calibration/` images, else the
built-in real photographs (`photos/`). The figures (`Agreement`) are logged, shown in the model's description and
exported as metrics; a model below its `[accuracy_gate]` bounds refuses to start with one line saying which path and by
how much. `vit-serve verify` prints the same figures for any images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from app.config.model_config import AccuracyGate
from app.engine.descriptions import Agreement
from app.errors import ModelLoadError

PHOTOS = Path(__file__).parent / "photos"
BUILT_IN = "built-in photographs"
CALIBRATION = "calibration images"


def compare(path: str, source: str, exact: torch.Tensor, fast: torch.Tensor, bounds: AccuracyGate) -> Agreement:
    """The agreement of `fast` logits with `exact` ones, (n, num_classes) each, and whether `bounds` are met."""
    exact, fast = exact.float(), fast.float()
    k = min(5, exact.shape[1])
    top1 = (exact.argmax(dim=1) == fast.argmax(dim=1)).float().mean().item()
    exact_top, fast_top = exact.topk(k, dim=1).indices, fast.topk(k, dim=1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(exact_top, fast_top, strict=True)]
    scale = exact.abs().amax(dim=1).clamp_min(1e-12)
    relative = (fast - exact).abs().amax(dim=1) / scale
    agreement = Agreement(
        path=path,
        images=exact.shape[0],
        source=source,
        top1_agreement=round(top1, 6),
        top5_overlap=round(sum(overlap) / len(overlap), 6),
        max_relative_error=float(relative.max()),
        mean_relative_error=float(relative.mean()),
    )
    return dataclasses.replace(agreement, passed=not shortfalls(agreement, bounds))


def shortfalls(agreement: Agreement, bounds: AccuracyGate) -> list[str]:
    """Each bound `agreement` misses, as 'top-1 agreement 0.875 < 0.99'."""
    missed = []
    if agreement.top1_agreement < bounds.min_top1_agreement:
        missed.append(f"top-1 agreement {agreement.top1_agreement:.4g} < {bounds.min_top1_agreement:g}")
    if bounds.min_top5_overlap is not None and agreement.top5_overlap < bounds.min_top5_overlap:
        missed.append(f"top-5 overlap {agreement.top5_overlap:.4g} < {bounds.min_top5_overlap:g}")
    if bounds.max_relative_error is not None and agreement.max_relative_error > bounds.max_relative_error:
        missed.append(f"max relative logit error {agreement.max_relative_error:.3g} > {bounds.max_relative_error:g}")
    if bounds.max_mean_relative_error is not None and agreement.mean_relative_error > bounds.max_mean_relative_error:
        missed.append(
            f"mean relative logit error {agreement.mean_relative_error:.3g} > {bounds.max_mean_relative_error:g}"
        )
    return missed


def enforce(model: str, agreement: Agreement, bounds: AccuracyGate) -> None:
    """Refuse a model below its bounds: one line, naming the path, the images and each bound missed."""
    missed = shortfalls(agreement, bounds)
    if missed:
        raise AccuracyGateFailed(
            f"model {model!r}: accuracy gate: {agreement.path} against torch fp32 on {agreement.images} "
            f"{agreement.source}: {'; '.join(missed)} (bounds: [accuracy_gate] in model.toml)"
        )


class AccuracyGateFailed(ModelLoadError):
    """A fast path computed answers too far from the exact path's: the model does not start."""


def table(model: str, agreement: Agreement, bounds: AccuracyGate) -> str:
    """The figures as `vit-serve verify` prints them: one line per measure, with its bound and whether it is met."""
    rows = [
        ("top-1 agreement", agreement.top1_agreement, bounds.min_top1_agreement, ">="),
        ("top-5 overlap", agreement.top5_overlap, bounds.min_top5_overlap, ">="),
        ("max relative logit error", agreement.max_relative_error, bounds.max_relative_error, "<="),
        ("mean relative logit error", agreement.mean_relative_error, bounds.max_mean_relative_error, "<="),
    ]
    lines = [
        f"model {model!r}: {agreement.path} against torch fp32 on {agreement.images} {agreement.source}",
        f"{'measure':<27}{'value':>12}  {'bound':<10}",
    ]
    for name, value, bound, sense in rows:
        if bound is None:
            verdict, shown = "", "-"
        else:
            met = value >= bound if sense == ">=" else value <= bound
            verdict, shown = ("ok" if met else "MISSED"), f"{sense} {bound:g}"
        lines.append(f"{name:<27}{value:>12.4g}  {shown:<10}{verdict}")
    lines.append("passed" if agreement.passed else "FAILED: the server would refuse to start this model")
    return "\n".join(lines)


def image_files(folder: Path) -> list[Path]:
    """The images in `folder` (not its sub-folders), by name; none when it does not exist."""
    from vit_serve_client.predict import IMAGE_SUFFIXES  # the suffixes `predict` and `batch` read: one list

    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def gate_images(calibration: Path | None, limit: int) -> tuple[list[bytes], str]:
    """The gate's images, at most `limit`: the model's calibration images, else the built-in photographs."""
    files = image_files(calibration) if calibration is not None else []
    source = CALIBRATION
    if not files:
        files, source = image_files(PHOTOS), BUILT_IN
    return [file.read_bytes() for file in files[:limit]], source
