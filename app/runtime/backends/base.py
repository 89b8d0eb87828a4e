"""The backend interface: a backend turns a loaded torch module into the forwards its lanes run.

`ForwardPlan` is everything a backend may use: the module (`pixels -> [logits | embedding]`, in fp32 for a backend
that exports it), the device and the precision asked for, the batch buckets, the export cache, the calibration images
(for int8) and the threads budget. `Backend.prepare` does the heavy part once (export, quantise, compile) and returns a
`ForwardFactory`, called once per lane. A backend refuses at start what it cannot run (`check`), with one line saying
what to change or install.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from app.config.settings import Precision
from app.errors import ModelLoadError
from app.runtime.runner import Forward

ForwardFactory = Callable[[], Forward]


@dataclass(frozen=True, slots=True)
class ForwardPlan:
    """What a backend builds a model's forwards from."""

    name: str  # the model's, for messages
    module: nn.Module  # (n, 3, side, side) -> (n, num_classes + embedding_dim), eval mode, on `device`
    device: torch.device
    dtype: torch.dtype  # the compute precision asked for (`dtype`); the module is in it for torch, fp32 otherwise
    precision: Precision
    input_shape: tuple[int, int, int]
    buckets: Sequence[int]
    compile: bool = False
    cuda_graphs: bool = False
    export_dir: Path | None = None  # where exports are cached (None: not cached, made again at every start)
    fingerprint: str = ""  # what the weights alone do not say: the model's config (arch, sizes, labels count)
    calibration: Callable[[], list[torch.Tensor]] | None = None  # preprocessed images, read only when int8 needs them
    threads: int = 1  # intra-op threads for a forward (the process's torch threads: the service's budget)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Backend(ABC):
    """One way to run a forward. `name` is what `backend = ...` says; `modules` what it needs installed."""

    name: ClassVar[str]
    modules: ClassVar[tuple[str, ...]] = ()  # importable modules it needs
    extra: ClassVar[str | None] = None  # the vit-serve extra that installs them

    def check(self, device: torch.device, dtype: torch.dtype, precision: Precision) -> None:
        """Refuse, before any weights are read, what this backend cannot run here: raise `ModelLoadError`."""
        missing = [module for module in self.modules if not installed(module)]
        if missing:
            raise ModelLoadError(
                f"backend {self.name} needs {', '.join(missing)}, which is not installed: "
                f"pip install 'vit-serve[{self.extra}]'"
            )

    def module_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the torch module is loaded in: the compute dtype for torch; fp32 for a backend that exports it
        (the export and the accuracy gate's reference read it, and explanations run on it)."""
        return torch.float32

    @abstractmethod
    def prepare(self, plan: ForwardPlan) -> ForwardFactory:
        """Export, quantise, compile: whatever is done once. The factory gives one forward per lane."""
