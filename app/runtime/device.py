"""Which device and dtype the models run on: `auto` means the GPU in fp16 where there is one, else the CPU in fp32."""

from __future__ import annotations

import torch

from app.config.settings import AccelerationConfig
from app.errors import ModelLoadError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads for the whole process (`Settings.resolved_torch_threads`; None: torch's own choice).
    Called once by what owns the process: the server's entry, a batch job's predictor."""
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available here; use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def check_acceleration(acceleration: AccelerationConfig, device: torch.device) -> None:
    """Refuse what cannot run on `device` (cuda_graphs and decode_device auto simply do nothing on a CPU)."""
    if acceleration.decode_device == "cuda" and device.type != "cuda":
        raise ModelLoadError(f"decode_device cuda needs the models on a GPU, not on {device}; use decode_device cpu")
