"""A lane: what one batch in flight needs on the model's device: its CUDA streams, pinned host buffers and forward.

A batch goes through its lane as: images preprocessed on the CPU stacked into a pinned buffer and copied to the
device on the lane's copy stream; JPEGs left for the device decoded there (`jpeg_decoders`, the lane's own
decoder, then `gpu_decode`'s preset); the forward on the lane's
compute stream, in chunks of at most `max_images_per_forward`; logits, probabilities and embeddings copied back into
a pinned buffer. A model has `pipeline_depth` lanes, so one batch's copies and decode overlap another's forward. On
the CPU a lane is the forward alone, run on the calling thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from app.errors import ServeError
from app.pipeline.gpu_decode import EncodedJpeg, preprocess_decoded
from app.pipeline.jpeg_decoders import TORCHVISION, DecodeBackend, JpegDecoder
from app.pipeline.postprocess import ImageOutput
from app.pipeline.preprocess import Preprocessor
from app.runtime.runner import Forward

Prepared = torch.Tensor | EncodedJpeg  # a (3, h, w) float32 image, or a JPEG to decode on the device


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """What every lane of a model shares."""

    device: torch.device
    dtype: torch.dtype
    input_shape: tuple[int, int, int]
    max_batch_size: int
    num_classes: int
    embedding_dim: int  # the forward gives (n, num_classes + embedding_dim): logits, then the embedding
    max_images_per_forward: int
    preprocessor: Preprocessor
    decode_on_cpu: Callable[[bytes], torch.Tensor]  # the CPU path, for a JPEG the device decoder refused
    decode_backend: DecodeBackend = TORCHVISION  # the library decoding the JPEGs left for the device


class Lane:
    """One batch at a time: `run` is called by one thread at a time (the model's lane pool sees to it)."""

    def __init__(self, spec: LaneSpec, forward: Forward) -> None:
        self.spec = spec
        self.forward = forward
        self._cuda = spec.device.type == "cuda"
        self._jpeg_decoder: JpegDecoder | None = None  # made at its first batch of JPEGs (in the warm-up)
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(spec.device)  # type: ignore[no-untyped-call]
            self._compute_stream = torch.cuda.Stream(spec.device)  # type: ignore[no-untyped-call]
            shape = (spec.max_batch_size, *spec.input_shape)
            self._host_in = torch.empty(shape, dtype=torch.float32, pin_memory=True)
            self._device_in = torch.empty(shape, dtype=torch.float32, device=spec.device)
            self._host_out = torch.empty((spec.max_batch_size, self._row_size), pin_memory=True)

    def run(self, images: Sequence[Prepared]) -> list[ImageOutput | ServeError]:
        """n prepared images -> n outputs, or the error of an image that could not be decoded on the device."""
        classes = self.spec.num_classes
        with torch.inference_mode():
            batch, errors = self._assemble(images)
            with self._on_compute_stream():
                out = torch.cat(
                    [
                        self.forward(chunk.to(self.spec.dtype)).to(torch.float32, copy=True)
                        for chunk in torch.split(batch, self.spec.max_images_per_forward)
                    ]
                )
                logits = out[:, :classes]
                rows = torch.cat([logits, logits.softmax(dim=-1), out[:, classes:]], dim=1)
                result = self._to_host(rows)  # (n, 2 * num_classes + embedding_dim)
        return [
            errors[i]
            if i in errors
            else ImageOutput(
                logits=result[i, :classes], probs=result[i, classes : 2 * classes], embedding=result[i, 2 * classes :]
            )
            for i in range(len(images))
        ]

    @property
    def _row_size(self) -> int:
        """One image's output row: logits, probabilities, embedding."""
        return 2 * self.spec.num_classes + self.spec.embedding_dim

    def warm_up(self, example: torch.Tensor) -> None:
        """Compile or capture every bucket, then a batch through `run`: a full one on CUDA (pinned buffers,
        streams); one image on the CPU, where a full batch warms nothing more and takes seconds."""
        with torch.inference_mode(), self._on_compute_stream():
            self.forward.warm_up(example[: self.spec.max_images_per_forward].to(self.spec.device, self.spec.dtype))
        self.run(list(example if self._cuda else example[:1]))

    @contextlib.contextmanager
    def _on_compute_stream(self) -> Iterator[None]:
        if not self._cuda:
            yield
            return
        with torch.cuda.stream(self._compute_stream):
            yield

    def _assemble(self, images: Sequence[Prepared]) -> tuple[torch.Tensor, dict[int, ServeError]]:
        """The batch as one (n, 3, h, w) float32 tensor on the device, ready on the compute stream."""
        ready = [(i, image) for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
        pixels = self._upload([image for _, image in ready])
        if len(ready) == len(images):
            return pixels, {}
        jpegs = [(i, image) for i, image in enumerate(images) if isinstance(image, EncodedJpeg)]
        with self._on_compute_stream():
            decoded, failed = self._decode([image for _, image in jpegs])
            batch = torch.zeros((len(images), *self.spec.input_shape), device=self.spec.device)
            if ready:
                batch[[i for i, _ in ready]] = pixels
            if decoded is not None:
                batch[[i for n, (i, _) in enumerate(jpegs) if n not in failed]] = decoded
        return batch, {jpegs[n][0]: error for n, error in failed.items()}

    def _upload(self, images: list[torch.Tensor]) -> torch.Tensor:
        """CPU tensors -> one device tensor: through a pinned buffer on the copy stream, the compute stream waiting."""
        if not self._cuda:
            return torch.stack(images) if images else torch.empty((0, *self.spec.input_shape))
        count = len(images)
        staged = self._device_in[:count]
        if count:
            host = self._host_in[:count]
            torch.stack(images, out=host)
            with torch.cuda.stream(self._copy_stream):
                staged.copy_(host, non_blocking=True)
            self._compute_stream.wait_stream(self._copy_stream)
        return staged

    def _decode(self, jpegs: list[EncodedJpeg]) -> tuple[torch.Tensor | None, dict[int, ServeError]]:
        """JPEGs -> their preprocessed pixels on the device (None when none decoded), and each failure by index.

        A JPEG the device decoder refuses is decoded on the CPU instead, which either succeeds or says why it fails.
        """
        device = self.spec.device
        pixels: list[torch.Tensor] = []
        errors: dict[int, ServeError] = {}
        if self._jpeg_decoder is None:
            self._jpeg_decoder = self.spec.decode_backend.new_decoder(device)
        decoded = self._jpeg_decoder.decode(jpegs, device)
        on_device = [image for image in decoded if image is not None]
        resized: Iterator[torch.Tensor] = iter(
            preprocess_decoded(on_device, self.spec.preprocessor) if on_device else []
        )
        for index, (jpeg, image) in enumerate(zip(jpegs, decoded, strict=True)):
            if image is not None:
                pixels.append(next(resized))
                continue
            try:
                pixels.append(self.spec.decode_on_cpu(jpeg.encoded).to(device))
            except ServeError as error:
                errors[index] = error
        return (torch.stack(pixels) if pixels else None), errors

    def _to_host(self, rows: torch.Tensor) -> torch.Tensor:
        """The output rows on the CPU; on CUDA through a pinned buffer, waiting for this lane's work alone."""
        if not self._cuda:
            return rows
        host = self._host_out[: rows.shape[0]]
        host.copy_(rows, non_blocking=True)  # one contiguous copy into the contiguous pinned rows
        self._compute_stream.synchronize()
        return host.clone()  # the pinned buffer is this lane's next batch's
