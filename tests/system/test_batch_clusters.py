"""`vit-serve batch` on clusters: a real local Ray cluster (2 CPUs, no dashboard) and Spark `local[2]` classify the
folder of ~200 real, generated and bad images into the same rows as `--engine local`, whose logits are the server's
(tests/integration/test_batch_local.py). On Ray, two actor processes share the work and `--resume` redoes only what
failed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.batch.job import Job, run
from app.batch.outputs import read_rows
from app.batch.spark import SparkPredictor, spark_schema
from app.config.settings import Settings
from tests.support.batch_images import BAD, write_image_folder, write_tiny_repository

pytestmark = [
    pytest.mark.slow,  # a Ray cluster and a Spark JVM are processes
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),  # Ray's own settings, deprecated within Ray
]

FP32_ATOL = 1e-5
Rows = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = write_tiny_repository(tmp_path_factory.mktemp("models"))
    return Settings(model_repository=root, model=["tiny"], device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def local_rows(settings: Settings, folder: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Rows:
    output = tmp_path_factory.mktemp("local") / "rows.jsonl"
    run(job(settings, folder, output), say=lambda line: None)
    return read_rows(output)


def job(settings: Settings, folder: list[Path], output: Path, **options: Any) -> Job:
    root = folder[0].parent.parent
    return Job([str(root)], output, settings, "tiny", logits=True, progress=False, **options)


def assert_same_rows(rows: Rows, expected: Rows) -> None:
    assert sorted(rows) == sorted(expected)
    for path, row in rows.items():
        want = expected[path]
        assert (row["error"], row["error_code"]) == (want["error"], want["error_code"]), path
        if want["error"] is None:
            np.testing.assert_allclose(row["logits"], want["logits"], atol=FP32_ATOL, err_msg=path)
            assert [c["index"] for c in row["top_k"]] == [c["index"] for c in want["top_k"]], path


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_gives_the_local_rows_from_two_actors_and_resume_redoes_only_the_failed(
    ray_cluster: None, settings: Settings, folder: list[Path], local_rows: Rows, tmp_path: Path
) -> None:
    output = tmp_path / "rows"
    summary = run(job(settings, folder, output, engine="ray", concurrency=2, batch_size=16), say=lambda line: None)
    assert (summary.succeeded, summary.failed) == (len(folder) - len(BAD), len(BAD))
    assert len(summary.workers) == 2, summary.workers  # two actor processes, each with rows of its own
    assert all(pid != str(os.getpid()) for pid in summary.workers)
    assert_same_rows(read_rows(output), local_rows)
    assert summary.failures == {code: n for code, n in _codes(local_rows).items()}

    again = run(job(settings, folder, output, engine="ray", concurrency=2, resume=True), say=lambda line: None)
    assert (again.skipped, again.succeeded, again.failed) == (len(folder) - len(BAD), 0, len(BAD))
    assert_same_rows(read_rows(output), local_rows)


def test_spark_map_in_pandas_gives_the_local_rows(
    settings: Settings, folder: list[Path], local_rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyspark.sql import SparkSession

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # the executors' Python: this one, with vit-serve
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "32")
        .getOrCreate()
    )
    try:
        spark.sparkContext.setLogLevel("ERROR")
        classify = SparkPredictor(settings, "tiny", logits=True)
        # A listing of paths, each read on the executor (the broken link among them)...
        listing = spark.createDataFrame([(str(p),) for p in folder], "path string").repartition(2)
        listed = listing.mapInPandas(classify, schema=spark_schema(logits=True)).collect()
        assert_same_rows({r["path"]: r.asDict(recursive=True) for r in listed}, local_rows)
        # ... and Spark's own binaryFile source, the bytes read by Spark.
        generated = folder[0].parent
        images = spark.read.format("binaryFile").option("pathGlobFilter", "*.png").load(str(generated))
        read = images.select("path", "content").mapInPandas(classify, schema=spark_schema(logits=True)).collect()
        rows = {r["path"].removeprefix("file:"): r.asDict(recursive=True) for r in read}
        pngs = {str(p) for p in generated.glob("*.png")}
        assert_same_rows(rows, {path: row for path, row in local_rows.items() if path in pngs})
    finally:
        spark.stop()
        _stop_the_jvm()


def _stop_the_jvm() -> None:
    """End the JVM and its connections now, while this test's output streams are open (at the interpreter's exit
    py4j logs to streams pytest has closed)."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is None:
        return
    jvm = gateway.proc  # the JVM process pyspark started; it ends when its stdin closes
    gateway.shutdown()
    SparkContext._gateway = None
    SparkContext._jvm = None
    jvm.stdin.close()
    jvm.wait(timeout=60)


def _codes(rows: Rows) -> dict[str, int]:
    codes: dict[str, int] = {}
    for row in rows.values():
        if row["error_code"]:
            codes[row["error_code"]] = codes.get(row["error_code"], 0) + 1
    return codes
