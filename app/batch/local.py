"""`vit-serve batch --engine local`: the predictor in this process, over every input, a chunk of rows at a time."""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterable, Iterator, Sequence

import pyarrow as pa

from app.batch import rows
from app.batch.inputs import reader
from app.config.settings import Settings
from app.engine.predictor import Outputs, Predictor, ReadImage


def local_tables(
    settings: Settings, model: str, paths: Sequence[str], *, top_k: int | None, logits: bool, embedding: bool
) -> Generator[pa.Table]:
    """The rows of `paths`, in order, one table per forward's chunk of images."""
    with Predictor(settings, model) as predictor:
        outputs = predictor.outputs(top_k=top_k, logits=logits, embedding=embedding)
        yield from predicted_tables(predictor, outputs, paths)


def predicted_tables(
    predictor: Predictor, outputs: Outputs, paths: Sequence[str], reads: Iterable[ReadImage] | None = None
) -> Iterator[pa.Table]:
    """`paths` through `predictor`: one table of rows per chunk. Each image is read on a decode thread, by its
    `reads` function where given, else from its path."""
    results = predictor.stream(reads if reads is not None else (reader(path) for path in paths), outputs)
    named = zip(paths, results, strict=True)
    while chunk := list(itertools.islice(named, predictor.chunk_size)):
        yield rows.table([rows.row(path, predictor.name, result, outputs) for path, result in chunk], outputs)
