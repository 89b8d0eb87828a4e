"""Spark: the predictor as a `mapInPandas` function, with the rows' schema in Spark's terms.

    images = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").load("s3a://bucket/photos/")
    classify = SparkPredictor(Settings(model_repository="/models"), "vit_b_16", top_k=5)
    images.select("path", "content").mapInPandas(classify, schema=spark_schema()).write.parquet("predictions/")

A frame holds a `path` column and, from the `binaryFile` source, a `content` column; without one, each path is read
on the executor (local paths, or URLs through fsspec). Each Python worker loads the model once, on its first frame,
and keeps it for the next tasks it runs (Spark reuses its Python workers). pyspark is the `spark` extra; this module
imports it nowhere (pandas comes with it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from app.batch.local import predicted_tables
from app.config.settings import Settings
from app.engine.predictor import Outputs, Predictor, ReadImage

if TYPE_CHECKING:
    import pandas as pd

_loaded: dict[tuple[str, str | None], Predictor] = {}  # this Python worker's models, by settings and name


def spark_schema(*, logits: bool = False, embedding: bool = False) -> str:
    """The rows' schema as Spark DDL, for `mapInPandas(..., schema=...)`."""
    columns = ["path string", "model string", "top_k array<struct<index:int,label:string,score:double>>"]
    if logits:
        columns.append("logits array<float>")
    if embedding:
        columns.append("embedding array<float>")
    columns += ["error string", "error_code string"]
    return ", ".join(columns)


class SparkPredictor:
    """`mapInPandas` function: frames of `path` (and `content`) -> frames of rows. Holds only its arguments, so that
    Spark can ship it to the executors; the model is loaded there."""

    def __init__(
        self,
        settings: Settings,
        model: str | None = None,
        *,
        top_k: int | None = None,
        logits: bool = False,
        embedding: bool = False,
    ) -> None:
        self.settings = settings
        self.model = model
        self.top_k = top_k
        self.logits = logits
        self.embedding = embedding

    def predictor(self) -> Predictor:
        key = (self.settings.model_dump_json(), self.model)
        if key not in _loaded:
            _loaded[key] = Predictor(self.settings, self.model)
        return _loaded[key]

    def __call__(self, frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        predictor = self.predictor()
        outputs: Outputs = predictor.outputs(top_k=self.top_k, logits=self.logits, embedding=self.embedding)
        for frame in frames:
            paths = [str(p) for p in frame["path"]]
            reads = [_given(data) for data in frame["content"]] if "content" in frame.columns else None
            for table in predicted_tables(predictor, outputs, paths, reads):
                yield table.to_pandas()


def _given(data: bytes) -> ReadImage:
    def read() -> bytes:
        return bytes(data)

    return read
