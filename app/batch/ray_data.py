"""Ray Data: the predictor as a callable class for `Dataset.map_batches`, one model per actor, and
`vit-serve batch --engine ray` on top of it.

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    ds = ds.map_batches(
        RayPredictor,
        fn_constructor_kwargs={"settings": Settings(model_repository="models"), "model": "vit_b_16"},
        concurrency=4, num_gpus=1, batch_size=64, batch_format="pyarrow",
    )
    ds.write_parquet("s3://bucket/predictions/")

A batch holds a `path` column and, from `read_binary_files`, a `bytes` column; without one, the actor reads each path
itself on its decode threads (local paths, or URLs through fsspec). Ray is the `ray` extra, imported only here.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Generator, Sequence
from typing import Any

import pyarrow as pa

from app.batch import rows
from app.batch.extras import require
from app.batch.local import predicted_tables
from app.config.settings import Settings
from app.engine.predictor import Predictor, ReadImage

ACTORS_START_S = 600  # for every actor to load and warm up its model
# The paths go to the actors in blocks: at least 4 an actor, so that all get work and the last ones finish together,
# and at most 2 batches each, so that rows come back (and the progress moves) steadily.
BLOCKS_PER_ACTOR = 4
BATCHES_PER_BLOCK = 2


class RayPredictor:
    """One model per actor (loaded and warmed up in the constructor); each batch -> its rows (an Arrow table).

    `worker_column`, when set, adds a column of that name saying which process (host:pid) classified the row.
    """

    def __init__(
        self,
        settings: Settings,
        model: str | None = None,
        *,
        top_k: int | None = None,
        logits: bool = False,
        embedding: bool = False,
        worker_column: str | None = None,
    ) -> None:
        self.predictor = Predictor(settings, model)
        self.outputs = self.predictor.outputs(top_k=top_k, logits=logits, embedding=embedding)
        self.worker_column = worker_column
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = [str(p) for p in batch.column("path").to_pylist()]
        reads: Sequence[ReadImage] | None = None
        if "bytes" in batch.column_names:
            reads = [_given(data) for data in batch.column("bytes").to_pylist()]
        tables = list(predicted_tables(self.predictor, self.outputs, paths, reads))
        table = pa.concat_tables(tables) if tables else rows.schema(self.outputs).empty_table()
        if self.worker_column:
            table = table.append_column(self.worker_column, pa.array([self.worker] * table.num_rows, pa.string()))
        return table


def ray_tables(
    settings: Settings,
    model: str,
    paths: Sequence[str],
    *,
    top_k: int | None,
    logits: bool,
    embedding: bool,
    address: str | None,
    concurrency: int,
    num_gpus: float,
    batch_size: int,
    worker_column: str | None = None,
) -> Generator[pa.Table]:
    """The rows of `paths`, classified by `concurrency` actors of a Ray cluster (the one at `address`, the one this
    process already joined, or a local one started here), as they come back to this process."""
    ray = require("ray", "Ray Data")
    require("ray.data", "Ray Data")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own bar counts rows as they arrive
    # Work starts once every actor has loaded its model, so that all share it from the first block (and a model that
    # cannot load on the cluster stops the job before any row).
    context.wait_for_min_actors_s = ACTORS_START_S
    # Ray Data gathers blocks up to a batch before it hands them to an actor: a job of fewer than `concurrency`
    # batches gets smaller ones, so that every actor has some.
    batch_size = max(1, min(batch_size, math.ceil(len(paths) / concurrency)))
    block = max(1, min(batch_size * BATCHES_PER_BLOCK, math.ceil(len(paths) / (concurrency * BLOCKS_PER_ACTOR))))
    listing = [pa.table({"path": list(paths[start : start + block])}) for start in range(0, len(paths), block)]
    dataset = ray.data.from_arrow(listing).map_batches(
        RayPredictor,
        fn_constructor_kwargs={
            "settings": settings,
            "model": model,
            "top_k": top_k,
            "logits": logits,
            "embedding": embedding,
            "worker_column": worker_column,
        },
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus or None,
        batch_size=batch_size,
        batch_format="pyarrow",
    )
    yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)


def _given(data: Any) -> ReadImage:
    def read() -> bytes:
        return bytes(data)

    return read
