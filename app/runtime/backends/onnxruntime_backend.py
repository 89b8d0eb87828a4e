"""The onnxruntime backend: the ONNX export (or its int8 quantisation) run by ONNX Runtime.

On the CPU, one session with the service's intra-op threads (the process's torch threads), shared by the lanes
(`InferenceSession.run` is thread-safe). On CUDA, the TensorRT and CUDA execution providers where the installed
package has them (onnxruntime-gpu), else start-up is refused. ONNX Runtime computes in fp32 (or int8): dtype fp16 and
bf16 are refused rather than silently computed in another precision.
"""

from __future__ import annotations

import logging

import torch

from app.config.settings import Precision
from app.errors import ModelLoadError
from app.runtime.backends.base import Backend, ForwardFactory, ForwardPlan
from app.runtime.backends.onnx_export import INPUT, plan_export

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    modules = ("onnxruntime", "onnx", "onnxscript")
    extra = "onnx"

    def check(self, device: torch.device, dtype: torch.dtype, precision: Precision) -> None:
        super().check(device, dtype, precision)
        if dtype != torch.float32:
            raise ModelLoadError(
                f"backend onnxruntime computes in fp32 (or int8 with precision int8), not {dtype}: set dtype fp32 "
                "(dtype auto is fp16 on a GPU), or use backend openvino for bf16 on a CPU"
            )
        if device.type == "cuda" and not set(GPU_PROVIDERS) & set(_providers()):
            raise ModelLoadError(
                "backend onnxruntime on a GPU needs ONNX Runtime's CUDA execution provider, which the installed "
                "onnxruntime lacks: pip install onnxruntime-gpu (in place of onnxruntime), or use device cpu"
            )

    def prepare(self, plan: ForwardPlan) -> ForwardFactory:
        import onnxruntime

        path = plan_export(plan)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = plan.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its threads sleep between runs instead of spinning: the decode threads need those cores meanwhile.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if plan.device.type == "cuda":
            index = plan.device.index or 0
            providers: list[str | tuple[str, dict[str, object]]] = [
                (name, {"device_id": index}) for name in GPU_PROVIDERS if name in _providers()
            ]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"model {plan.name!r}: ONNX Runtime cannot load {path}: {exc}") from exc
        log.info("model %r: ONNX Runtime on %s, %d threads", plan.name, session.get_providers()[0], plan.threads)
        forward = OnnxRuntimeForward(session, plan.device)
        return lambda: forward


class OnnxRuntimeForward:
    """(n, 3, h, w) float32 -> (n, outputs) float32 on the model's device, through the session."""

    def __init__(self, session: object, device: torch.device) -> None:
        self._session = session
        self._device = device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self._session.run(None, {INPUT: pixels})  # type: ignore[attr-defined]
        return torch.from_numpy(out).to(self._device)

    def warm_up(self, example: torch.Tensor) -> None:
        self(example[:1])  # the session's first run sets up its kernels


def _providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())
