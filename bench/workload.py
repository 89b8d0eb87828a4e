"""The benchmark workload, exactly as the peers were measured (../shared/bench-peers): images, models, pipeline.

W-small: scikit-image's chelsea.png as RGB, JPEG quality 90 (451x300). W-photo: the same resized to 1920x1280
(bilinear), JPEG quality 90. M-tiny: VisionTransformer(224, 16, 2 layers, 2 heads, hidden 64, mlp 128, 1000
classes) after torch.manual_seed(0). M-base: vit_b_16(weights=None) after torch.manual_seed(0).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

MODELS = ("tiny", "base")
WORKLOADS = ("small", "photo")
MAX_BATCH, MAX_DELAY_MS = 16, 10


def image(workload: str) -> bytes:
    import skimage

    source = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", "chelsea.png")).convert("RGB")
    if workload == "photo":
        source = source.resize((1920, 1280), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    module: nn.Module
    if name == "tiny":
        module = VisionTransformer(
            image_size=224, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=1000
        )
    else:
        module = vit_b_16(weights=None)
    return module.eval()


def write(work: Path) -> dict[str, Path]:
    """Images and model folders (this service's model repository) under `work`; returns the image paths."""
    repository = work / "models"
    for name in MODELS:
        folder = repository / f"m{name}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "weights.pth").exists():
            torch.save(model(name).state_dict(), folder / "weights.pth")
        arch = (
            'arch = "vit"\n\n[arch_params]\nimage_size = 224\npatch_size = 16\nnum_layers = 2\nnum_heads = 2\n'
            "hidden_dim = 64\nmlp_dim = 128\n"
            if name == "tiny"
            else 'arch = "vit_b_16"\n'
        )
        (folder / "model.toml").write_text(
            f'weights = "weights.pth"\nlabels = "imagenet"\nnum_classes = 1000\n{arch}\n'
            f"[batching]\nmax_batch_size = {MAX_BATCH}\nmax_queue_delay_ms = {MAX_DELAY_MS}\n"
        )
    paths = {}
    for workload in WORKLOADS:
        paths[workload] = work / f"w_{workload}.jpg"
        paths[workload].write_bytes(image(workload))
    return paths
