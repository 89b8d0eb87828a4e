"""On a GPU: what embeddings and explanations cost (issue 10). ViT-B/16, random weights, fp16, on random inputs.

1. The classify path's graphed forward with logits alone against the served `[logits | embedding]` module (with the
   copy back to the host), at batch 1 and 64, the logits-only module measured again last (the run's own noise).
2. The explain path's eager attention-reading forward with rollout, against the plain eager forward, at batch 1 and 8.

    PYTHONPATH=. python3 bench/gpu_heads.py      # prints one line per row; run on the GPU host (bench/gpu_check.sh's
                                                 # set-up: wheels from .whl/)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torchvision.models import vit_b_16

from app.runtime.runner import GraphedForward
from app.sources.attention import rollout
from app.sources.torchvision_models import TorchvisionSource


def seconds_per_call(fn: Callable[[torch.Tensor], object], x: torch.Tensor, n: int = 50) -> float:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / n


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = vit_b_16(weights=None).eval().requires_grad_(False).to(device, torch.float16)
    source = TorchvisionSource()
    served, read_attention = source.split_head(model, 224), source.attention(model)
    assert served is not None and read_attention is not None
    print(torch.cuda.get_device_name(device), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with torch.inference_mode():
        for batch in (1, 64):
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.float16)
            rows = {}
            for name, module in (("logits", model), ("logits+embedding", served), ("logits again", model)):
                graphed = GraphedForward(module, [batch])
                graphed.warm_up(x)
                rows[name] = seconds_per_call(lambda x, g=graphed: g(x).float().cpu(), x)  # type: ignore[misc]
            print(
                f"graphs fp16 b={batch}: "
                + ", ".join(f"{k} {v * 1e3:.3f} ms ({batch / v:.0f} img/s)" for k, v in rows.items())
            )
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.float16)

            def explain(x: torch.Tensor) -> torch.Tensor:
                found = read_attention(x)
                return rollout(found.layers, found.prefix_tokens, found.grid).cpu()

            explained = seconds_per_call(explain, x, 20)
            plain = seconds_per_call(lambda x: model(x).float().cpu(), x, 20)
            print(
                f"eager fp16 b={batch}: explain {explained * 1e3:.2f} ms ({batch / explained:.0f} img/s), "
                f"plain eager forward {plain * 1e3:.2f} ms ({batch / plain:.0f} img/s)"
            )


if __name__ == "__main__":
    main()
