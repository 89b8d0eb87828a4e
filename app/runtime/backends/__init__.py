"""Backends: what runs a model's forward. `torch` (eager, compiled or CUDA-graphed), `onnxruntime` and `openvino` (the
model exported to ONNX once, cached on disk), each behind the one `Backend` interface (`base`); `registry` maps a name
to its backend."""
