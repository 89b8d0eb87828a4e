"""The torch backend: the module itself, eager, `torch.compile`d, or replayed as CUDA graphs (`runtime.runner`)."""

from __future__ import annotations

import torch

from app.config.settings import Precision
from app.errors import ModelLoadError
from app.runtime.backends.base import Backend, ForwardFactory, ForwardPlan
from app.runtime.runner import build_forward, compile_module


class TorchBackend(Backend):
    name = "torch"

    def check(self, device: torch.device, dtype: torch.dtype, precision: Precision) -> None:
        if precision == "int8":
            raise ModelLoadError(
                "precision int8 runs on backend onnxruntime or openvino (a statically quantised ONNX export), not on "
                "torch; set backend too"
            )

    def module_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def prepare(self, plan: ForwardPlan) -> ForwardFactory:
        compiled = compile_module(plan.module) if plan.compile else None
        return lambda: build_forward(
            plan.module, device=plan.device, buckets=plan.buckets, compiled=compiled, cuda_graphs=plan.cuda_graphs
        )
