"""A batch job's rows: one per input image, the fields of `vit-serve predict`'s lines (path, top_k, error) and the
model, the logits and embedding when asked for, and the failed image's error code. Every engine (local, Ray, Spark)
writes this one schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from app.engine.predictor import ImageResult, Outputs

Row = dict[str, Any]

TOP_K = pa.list_(pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float64())]))


def schema(outputs: Outputs) -> pa.Schema:
    """The Arrow schema of the rows for `outputs`: logits and embedding columns only when asked for."""
    fields = [("path", pa.string()), ("model", pa.string()), ("top_k", TOP_K)]
    if outputs.logits:
        fields.append(("logits", pa.list_(pa.float32())))
    if outputs.embedding:
        fields.append(("embedding", pa.list_(pa.float32())))
    fields += [("error", pa.string()), ("error_code", pa.string())]
    return pa.schema(fields)


def row(path: str, model: str, result: ImageResult, outputs: Outputs) -> Row:
    """One image's row; a failed image's has `error` (its message) and `error_code`, and no classes."""
    prediction, failure = result.prediction, result.failure
    fields: Row = {
        "path": path,
        "model": model,
        "top_k": [{"index": s.index, "label": s.label, "score": s.score} for s in prediction.top_k]
        if prediction
        else None,
    }
    if outputs.logits:
        fields["logits"] = prediction.logits.tolist() if prediction and prediction.logits is not None else None
    if outputs.embedding:
        fields["embedding"] = result.embedding.tolist() if result.embedding is not None else None
    fields["error"] = failure.message if failure else None
    fields["error_code"] = failure.code if failure else None
    return fields


def table(rows: Sequence[Row], outputs: Outputs) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=schema(outputs))
