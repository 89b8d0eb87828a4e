"""The openvino backend: the ONNX export (or its int8 quantisation) compiled by OpenVINO for the CPU.

OpenVINO computes in whatever precision it is told: the `dtype` setting becomes its inference precision hint (fp32
-> f32, bf16 -> bf16, fp16 -> f16), set explicitly, because left unset it computes in bf16 wherever the CPU has bf16
instructions. One compiled model with the service's threads, one infer request per lane (a request runs one batch at a
time). The model runs on the CPU: on a GPU host use backend torch or onnxruntime.
"""

from __future__ import annotations

import logging

import torch

from app.config.settings import Precision
from app.errors import ModelLoadError
from app.runtime.backends.base import Backend, ForwardFactory, ForwardPlan, installed
from app.runtime.backends.onnx_export import plan_export

log = logging.getLogger(__name__)

HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class OpenVinoBackend(Backend):
    name = "openvino"
    modules = ("openvino", "onnx", "onnxscript")
    extra = "openvino"

    def check(self, device: torch.device, dtype: torch.dtype, precision: Precision) -> None:
        super().check(device, dtype, precision)
        if device.type != "cpu":
            raise ModelLoadError(
                f"backend openvino runs on the CPU, not on {device}: set device cpu, or use backend torch or "
                "onnxruntime on a GPU"
            )
        if precision == "int8" and not installed("onnxruntime"):
            raise ModelLoadError(
                "precision int8 is quantised by ONNX Runtime's quantiser, which is not installed: "
                "pip install 'vit-serve[openvino]'"
            )

    def prepare(self, plan: ForwardPlan) -> ForwardFactory:
        import openvino

        path = plan_export(plan)
        hint = HINTS[plan.dtype]
        config = {
            "INFERENCE_NUM_THREADS": plan.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": hint,
        }
        try:
            compiled = openvino.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:
            raise ModelLoadError(f"model {plan.name!r}: OpenVINO cannot compile {path}: {exc}") from exc
        log.info("model %r: OpenVINO on the CPU, %s, %d threads", plan.name, hint, plan.threads)
        return lambda: OpenVinoForward(compiled)


class OpenVinoForward:
    """(n, 3, h, w) float32 -> (n, outputs) float32, through this lane's own infer request."""

    def __init__(self, compiled: object) -> None:
        self._request = compiled.create_infer_request()  # type: ignore[attr-defined]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.detach().to(torch.float32).contiguous().numpy()
        self._request.infer({0: pixels})
        return torch.from_numpy(self._request.get_output_tensor(0).data.copy())

    def warm_up(self, example: torch.Tensor) -> None:
        self(example[:1])
