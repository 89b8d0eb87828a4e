"""Stage 4, forward: a batch already on the model's device -> logits, run eagerly, compiled, or as CUDA graphs.

Compiled and graphed forwards see only a fixed set of batch sizes, the buckets: a batch is padded up to the smallest
bucket that holds it (its padding rows are computed and dropped; a ViT's images never mix, so they change nothing),
and the warm-up runs every bucket so that nothing compiles or captures while serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int, configured: Sequence[int] = ()) -> list[int]:
    """The batch sizes a batch is padded up to: `configured` (or powers of two) up to `max_batch_size`, and it."""
    if configured:
        sizes = {size for size in configured if size < max_batch_size}
    else:
        sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size}
    return sorted(sizes | {max_batch_size})


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `size` images (`buckets` sorted; `size` at most the largest)."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"a batch of {size} is over the largest bucket, {buckets[-1]}")


class Forward(Protocol):
    """(n, 3, h, w) in the model's dtype on its device -> (n, num_classes), n at most the largest bucket."""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...

    def warm_up(self, example: torch.Tensor) -> None:
        """Run (compile, capture) every batch size this forward will see; `example` holds the largest batch."""
        ...


class EagerForward:
    """The module as it is: any batch size, nothing to warm up (the lane's first batch warms the allocator)."""

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._module = module

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self._module(batch)

    def warm_up(self, example: torch.Tensor) -> None:
        pass


class BucketedForward:
    """A compiled module, fed only bucket sizes: each one compiles in the warm-up, and never again.

    Every batch is copied into a fresh tensor of its bucket's size, so that the compiled code's guards always see
    the same kind of input (never a view of a larger buffer) and nothing recompiles while serving.
    """

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], buckets: Sequence[int]) -> None:
        self._module = module
        self.buckets = list(buckets)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        size = batch.shape[0]
        padded = batch.new_zeros((bucket_for(size, self.buckets), *batch.shape[1:]))
        padded[:size] = batch
        return self._module(padded)[:size]

    def warm_up(self, example: torch.Tensor) -> None:
        for bucket in reversed(self.buckets):
            self(example[:bucket])


class GraphedForward:
    """One CUDA graph per bucket, replayed: a whole forward is one launch, with no Python or launch gaps.

    Each graph owns a static input and output; a batch is copied into its bucket's input, the graph replayed, and
    the first rows of its output returned. The output is overwritten by the next call, so a caller uses it (or
    copies it) first; one `GraphedForward` serves one thread at a time. Every bucket's graph shares one memory pool,
    captured largest first, since they never run at the same time.
    """

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], buckets: Sequence[int]) -> None:
        self._module = module
        self.buckets = list(buckets)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        size = batch.shape[0]
        bucket = bucket_for(size, self.buckets)
        graph, static_input, static_output = self._graphs[bucket]
        static_input[:size].copy_(batch)  # rows past `size` keep an earlier batch's data, computed and dropped
        graph.replay()
        return static_output[:size]

    def warm_up(self, example: torch.Tensor) -> None:
        """Capture every bucket's graph, after running it eagerly on a side stream as capture requires."""
        pool = None
        for bucket in reversed(self.buckets):
            static_input = example[:bucket].clone()
            side = torch.cuda.Stream(device=example.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles (when compiled) and settles the allocator before capture
                    self._module(static_input)
            torch.cuda.current_stream(example.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_output = self._module(static_input)
            pool = graph.pool()
            self._graphs[bucket] = (graph, static_input, static_output)
        torch.cuda.synchronize(example.device)


def compile_module(module: nn.Module, *, backend: str = "inductor") -> Callable[[torch.Tensor], torch.Tensor]:
    """`torch.compile` with a dynamic batch dimension: one compilation serves every bucket."""
    compiled: Callable[[torch.Tensor], torch.Tensor] = torch.compile(module, dynamic=True, backend=backend)
    return compiled


def build_forward(
    module: nn.Module,
    *,
    device: torch.device,
    buckets: Sequence[int],
    compiled: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cuda_graphs: bool = False,
) -> Forward:
    """The forward for one lane: graphs (on CUDA) over the compiled or plain module, else compiled, else eager."""
    target: Callable[[torch.Tensor], torch.Tensor] = module if compiled is None else compiled
    if cuda_graphs and device.type == "cuda":
        return GraphedForward(target, buckets)
    if compiled is not None:
        return BucketedForward(compiled, buckets)
    return EagerForward(module)
