"""The ONNX export shared by the onnxruntime and openvino backends: made once, cached on disk, reused at every start.

The module is exported with torch's ONNX exporter (`torch.onnx.export(dynamo=True)`, through `torch.export`) with a
dynamic batch dimension: one graph serves every batch size. An export is keyed by a hash of the weights (every tensor
of the module's state), of the model's config as the plan's `fingerprint` states it, and of the torch and opset
versions: changed weights or a changed config never reuse a stale export. int8 is ONNX Runtime's post-training
static quantisation (`quantize_static`, QDQ format) of that export, calibrated on the model's own calibration images,
keyed by those images too; both runtimes run the quantised graph. Files are written under a temporary name and renamed,
so that workers exporting at once, or a process killed mid-export, never leave a half-written file to be read.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch

from app.errors import ModelLoadError
from app.runtime.backends.base import ForwardPlan

log = logging.getLogger(__name__)

OPSET = 18
INPUT, OUTPUT = "pixels", "outputs"
# What int8 quantises: the matrix products, where a ViT spends its time. LayerNorm, softmax and GELU stay in float,
# where int8 costs the most accuracy for the least speed (the usual recipe for transformers).
QUANTISED_OPS = ("MatMul", "Gemm")
MAX_CALIBRATION_IMAGES = 512  # calibration images read, at most


def export_key(plan: ForwardPlan) -> str:
    """The hash an export is cached under: the weights, the config's fingerprint, torch's version and the opset."""
    digest = hashlib.sha256()
    digest.update(f"{plan.fingerprint}|{plan.input_shape}|torch {torch.__version__}|opset {OPSET}".encode())
    for name, tensor in plan.module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def onnx_export(plan: ForwardPlan) -> Path:
    """The model's fp32 ONNX export, from the cache or made now (seconds for a ViT-B)."""
    name = f"{export_key(plan)}.onnx"
    cached = _cached(plan, name)
    if cached is not None:
        return cached
    path = _cache_folder(plan) / name
    for chatty in ("onnx_ir", "onnxscript"):  # the exporter's passes log every step at INFO
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger(chatty).level))
    module = copy.deepcopy(plan.module).to("cpu", torch.float32).eval()
    example = torch.zeros((2, *plan.input_shape))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _temporary(path) as partial:
        try:
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            assert program is not None
            program.save(str(partial))
        except Exception as exc:
            raise ModelLoadError(
                f"model {plan.name!r}: cannot export it to ONNX ({type(exc).__name__}: {_first_line(exc)}); "
                "serve it with backend torch"
            ) from exc
    log.info("model %r: exported to ONNX: %s", plan.name, path)
    return path


def int8_export(plan: ForwardPlan, fp32: Path) -> Path:
    """The fp32 export statically quantised to int8 on the calibration images, from the cache or made now."""
    if plan.calibration is None:
        raise ModelLoadError(f"model {plan.name!r}: precision int8 needs calibration images")
    images = plan.calibration()[:MAX_CALIBRATION_IMAGES]  # the first, by name
    if not images:
        raise ModelLoadError(f"model {plan.name!r}: precision int8 needs calibration images; none were found")
    digest = hashlib.sha256(fp32.stem.encode())
    for image in images:
        digest.update(image.contiguous().numpy().tobytes())
    name = f"{digest.hexdigest()[:32]}.int8.onnx"
    cached = _cached(plan, name)
    if cached is not None:
        return cached
    path = _cache_folder(plan) / name  # not fp32's folder: an export baked into a read-only cache
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._images = iter(images)

        def get_next(self) -> dict[str, object] | None:
            image = next(self._images, None)
            return None if image is None else {INPUT: image[None].numpy()}

    log.info("model %r: quantising to int8 on %d calibration images ...", plan.name, len(images))
    with _temporary(path) as partial:
        quantize_static(
            str(fp32),
            str(partial),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTISED_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    log.info("model %r: int8 export: %s", plan.name, path)
    return path


def plan_export(plan: ForwardPlan) -> Path:
    """The ONNX file `plan` asks for: the fp32 export, or its int8 quantisation."""
    fp32 = onnx_export(plan)
    return int8_export(plan, fp32) if plan.precision == "int8" else fp32


def _cached(plan: ForwardPlan, name: str) -> Path | None:
    """The export `name` in the cache, if it is there (read even where the cache cannot be written: baked in)."""
    if plan.export_dir is None or not (plan.export_dir / name).is_file():
        return None
    path = plan.export_dir / name
    log.info("model %r: export %s from the cache", plan.name, path)
    return path


def _cache_folder(plan: ForwardPlan) -> Path:
    """The export cache, made if missing; a temporary folder (with a warning) when it cannot be written."""
    folder = plan.export_dir
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    fallback = Path(tempfile.mkdtemp(prefix="vit-serve-exports-"))
    log.warning(
        "model %r: the export cache %s cannot be written; exporting to %s, which is not kept",
        plan.name,
        folder,
        fallback,
    )
    return fallback


class _temporary:
    """A temporary path beside `path`, renamed to it on success, removed on failure."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._partial = path.with_name(f".{path.name}.{os.getpid()}.partial")

    def __enter__(self) -> Path:
        return self._partial

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if kind is None:
            os.replace(self._partial, self._path)
        else:
            self._partial.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
