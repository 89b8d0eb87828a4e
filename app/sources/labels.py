"""Class labels: torchvision's ImageNet categories or a file with one label a line."""

from __future__ import annotations

from torchvision.models import ViT_B_16_Weights

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError


def imagenet_labels() -> list[str]:
    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])


def load_labels(config: ModelConfig) -> list[str]:
    """The model's labels, as many as its classes; index names ("0", "1", ...) when no labels are given."""
    if config.labels is None:
        if config.num_classes is None:
            raise ModelLoadError(f'model {config.name!r}: set labels ("imagenet" or a file) or num_classes')
        return [str(i) for i in range(config.num_classes)]
    if config.labels == "imagenet":
        labels = imagenet_labels()
    else:
        path = config.resolve(config.labels)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ModelLoadError(f"model {config.name!r}: cannot read labels file {path}: {exc.strerror}") from exc
        labels = [line.strip() for line in lines if line.strip()]
    if config.num_classes is not None and config.num_classes != len(labels):
        raise ModelLoadError(
            f"model {config.name!r}: num_classes = {config.num_classes} but labels has {len(labels)} entries"
        )
    if not labels:
        raise ModelLoadError(f"model {config.name!r}: the labels file is empty")
    return labels
