"""The engine without a server: a synchronous predictor for batch jobs (no asyncio, no HTTP, no queue).

    with Predictor(Settings(model_repository="models"), "vit_b_16") as predictor:
        results = predictor.predict([jpeg_bytes, png_bytes], top_k=5, logits=True)

The model is loaded by the server's own loader (`ModelLoader`) and warmed up as the server warms it; images are
decoded and preprocessed by `ServedModel.prepare` on decode threads while the previous chunk runs through
`ServedModel.forward`, so a result's logits are those `/v1/classify` gives for the same image. An image that cannot be
read or decoded is a failed result with its error code; it never fails the others.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from app.config.settings import Settings
from app.engine.facade import Limits, checked_top_k
from app.engine.loading import ModelLoader
from app.engine.served_model import ServedModel
from app.errors import InvalidParameter, ServeError
from app.pipeline import postprocess
from app.pipeline.postprocess import Prediction
from app.runtime.device import set_torch_threads
from app.runtime.lanes import Prepared

CHUNKS_AHEAD = 2  # chunks decoding while one runs through the forward: the decode threads never wait for it

ReadImage = Callable[[], bytes]  # an image's encoded bytes, read when a decode thread gets to it


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one image has no result: a machine code (those of the API's errors, or `unreadable`) and a message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ImageResult:
    """One image's outcome: its prediction (top-k, and logits when asked), its embedding when asked; or a failure."""

    prediction: Prediction | None = None
    embedding: np.ndarray | None = None  # float32 (dim,)
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class Outputs:
    """What each result carries beyond its top-k."""

    top_k: int
    logits: bool = False
    embedding: bool = False


class Predictor:
    """One model, loaded and warm, on this process's device: encoded images in, one result per image out, in order."""

    def __init__(self, settings: Settings, model: str | None = None) -> None:
        set_torch_threads(settings.resolved_torch_threads())
        self.settings = settings
        self.model: ServedModel = ModelLoader(settings)(model or settings.default_model)
        self.model.warm_up()
        self._limits = Limits.from_settings(settings).image
        self._pool = ThreadPoolExecutor(settings.resolved_decode_workers(), thread_name_prefix="batch-decode")
        self.images_processed = 0  # images sent to the decode threads, failed or not

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def chunk_size(self) -> int:
        """Images per forward call: the model's largest batch (its lanes split it further where device memory
        bounds a forward, as the warm-up measured)."""
        return self.model.batcher.config.max_batch_size

    def outputs(self, *, top_k: int | None = None, logits: bool = False, embedding: bool = False) -> Outputs:
        """The outputs asked for, checked against the model: `top_k` defaults to 5 (every class for fewer)."""
        served = self.model
        k = checked_top_k(served.num_classes, top_k)
        if embedding and not served.embedding_dim:
            raise InvalidParameter(
                f"model {served.name!r} has no embeddings: its head could not be split off",
                code="embedding_unsupported",
            )
        return Outputs(k, logits, embedding)

    def predict(
        self, images: Sequence[bytes], *, top_k: int | None = None, logits: bool = False, embedding: bool = False
    ) -> list[ImageResult]:
        """Encoded images -> one result per image, in order."""
        reads = [functools.partial(_given, data) for data in images]
        return list(self.stream(reads, self.outputs(top_k=top_k, logits=logits, embedding=embedding)))

    def stream(self, reads: Iterable[ReadImage], outputs: Outputs) -> Iterator[ImageResult]:
        """One result per image of `reads`, in order, as each chunk comes out of the forward. `CHUNKS_AHEAD` chunks
        are read and decoded on the decode threads while the current one runs; memory stays bounded by them."""
        pending: collections.deque[list[Future[Prepared | Failure]]] = collections.deque()
        remaining = iter(reads)

        def submit_next_chunk() -> None:
            chunk = list(itertools.islice(remaining, self.chunk_size))
            if chunk:
                self.images_processed += len(chunk)
                pending.append([self._pool.submit(self._prepare, read) for read in chunk])

        for _ in range(1 + CHUNKS_AHEAD):
            submit_next_chunk()
        while pending:
            futures = pending.popleft()
            submit_next_chunk()
            yield from self._forward([future.result() for future in futures], outputs)

    def _prepare(self, read: ReadImage) -> Prepared | Failure:
        """On a decode thread: read, decode and preprocess one image, or say why it could not be."""
        try:
            return self.model.prepare(read(), self._limits)
        except ServeError as error:
            return Failure(error.code, error.message)
        except OSError as error:
            return Failure("unreadable", f"cannot read the image: {error.strerror or error}")
        except Exception as error:  # a decoder's own bug: this image's failure, as the server answers it with a 500
            return Failure("internal_error", f"{type(error).__name__}: {error}")

    def _forward(self, prepared: list[Prepared | Failure], outputs: Outputs) -> list[ImageResult]:
        """The chunk's decoded images through one forward; failures keep their place."""
        images = [p for p in prepared if not isinstance(p, Failure)]
        forwarded = iter(self.model.forward(images) if images else [])
        results = []
        for item in prepared:
            output = item if isinstance(item, Failure) else next(forwarded)
            if isinstance(output, Failure):
                results.append(ImageResult(failure=output))
            elif isinstance(output, ServeError):  # an image the device could not decode
                results.append(ImageResult(failure=Failure(output.code, output.message)))
            else:
                prediction = postprocess.top_k(output, outputs.top_k, self.model.labels, with_logits=outputs.logits)
                embedding = output.embedding.numpy() if outputs.embedding else None
                results.append(ImageResult(prediction, embedding))
        return results

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _given(data: bytes) -> bytes:
    return data
