"""Which library decodes the JPEGs sent to the device (`decode_backend`): torchvision's nvJPEG, or nvImageCodec, which
uses the hardware JPEG decoder of an A100/H100/H200 where the card has one and nvJPEG's batched CUDA decode otherwise.

Both take what `probe_jpeg` let through (complete, upright, RGB or greyscale JPEGs within the pixel limit) and give
(3, h, w) uint8 tensors on the device, on the current CUDA stream, with None for an image the decoder failed on: that
image alone is decoded on the CPU instead. The backend is chosen once, when the model loads; each lane has its own
decoder, used by one thread at a time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from app.config.settings import DecodeBackendSetting
from app.errors import ModelLoadError
from app.pipeline.gpu_decode import EncodedJpeg, decode_jpegs

NVIMAGECODEC_MODULE = "nvidia.nvimgcodec"
NVIMAGECODEC_PIP = "pip install 'vit-serve[nvimagecodec]'"


class JpegDecoder(Protocol):
    def decode(self, images: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
        """A batch of JPEGs -> (3, h, w) uint8 each on `device`, or None for one to decode on the CPU instead."""
        ...


@dataclass(frozen=True, slots=True)
class DecodeBackend:
    """A decode library, as resolved from the setting: its name (reported by the model) and a decoder per lane."""

    name: Literal["torchvision", "nvimagecodec"]
    new_decoder: Callable[[torch.device], JpegDecoder]


class TorchvisionDecoder:
    """torchvision.io.decode_jpeg: nvJPEG's CUDA decode on the SMs (or libjpeg when `device` is the CPU)."""

    def decode(self, images: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
        return decode_jpegs(images, device)


class NvImageCodecDecoder:
    """nvImageCodec's batched decode: the hardware decoder first, then the GPU (CUDA) and hybrid CPU+GPU decoders."""

    def __init__(self, nvimgcodec: Any, device: torch.device) -> None:
        kinds = nvimgcodec.BackendKind
        backends = [nvimgcodec.Backend(kind) for kind in (kinds.HW_GPU_ONLY, kinds.GPU_ONLY, kinds.HYBRID_CPU_GPU)]
        self._nvimgcodec = nvimgcodec
        self._decoder = nvimgcodec.Decoder(
            device_id=-1 if device.index is None else device.index,  # -1: the current device
            max_num_cpu_threads=2,  # for the hybrid decoder alone; a lane's, of which a GPU has several per worker
            backends=backends,
        )
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=True,  # a no-op: probe_jpeg lets upright JPEGs alone through
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.I_RGB,  # greyscale too comes out as 3 channels, as with torchvision
        )

    def decode(self, images: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
        # the lane's compute stream: nvImageCodec decodes on it, and the tensors are ready on it
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        sources = [self._code_stream(image.encoded) for image in images]
        parsed = [source for source in sources if source is not None]
        if not parsed:
            return [None] * len(images)
        try:
            decoded = self._decoder.decode(parsed, params=self._params, cuda_stream=stream)
        except Exception:  # the batch as a whole refused: each image alone, so one bad image fails only itself
            decoded = [self._decode_one(source, stream) for source in parsed]
        images_out = iter(decoded)
        return [None if source is None else _to_chw(next(images_out), device) for source in sources]

    def _code_stream(self, data: bytes) -> Any:
        try:
            return self._nvimgcodec.CodeStream(data)  # parses the header
        except Exception:
            return None

    def _decode_one(self, source: Any, stream: int) -> Any:
        try:
            return self._decoder.decode(source, params=self._params, cuda_stream=stream)
        except Exception:
            return None


TORCHVISION = DecodeBackend("torchvision", lambda device: TorchvisionDecoder())


def _to_chw(image: Any, device: torch.device) -> torch.Tensor | None:
    """An nvImageCodec image (its __cuda_array_interface__ on a GPU, no copy) -> (3, h, w) uint8; None stays None."""
    if image is None:
        return None
    hwc = torch.as_tensor(image, device=device)  # (h, w, 3), keeps `image` alive while the tensor is
    return hwc.permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)


def nvimagecodec_available() -> bool:
    try:
        importlib.import_module(NVIMAGECODEC_MODULE)
    except ImportError:
        return False
    return True


def decode_backend(setting: DecodeBackendSetting, *, on_device: bool) -> DecodeBackend:
    """The backend `setting` names; `auto`: nvImageCodec when it is installed and JPEGs are decoded on a GPU.

    `nvimagecodec` without its package is a start-up error that says what to install.
    """
    if setting == "auto":
        setting = "nvimagecodec" if on_device and nvimagecodec_available() else "torchvision"
    if setting == "torchvision":
        return TORCHVISION
    try:
        nvimgcodec = importlib.import_module(NVIMAGECODEC_MODULE)
    except ImportError as exc:
        raise ModelLoadError(
            f"decode_backend nvimagecodec needs nvImageCodec, which is not installed: {NVIMAGECODEC_PIP}"
        ) from exc
    return DecodeBackend("nvimagecodec", lambda device: NvImageCodecDecoder(nvimgcodec, device))
