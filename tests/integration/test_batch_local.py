"""`vit-serve batch --engine local`, run in this process: a folder of ~200 real, generated and bad images gives one row
per input, each successful row with the server's logits and each bad file a failed row with the server's code;
`--resume` redoes only what failed or is new; inputs as globs and listings; the start-up errors."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.batch import local
from app.batch.extras import MissingExtra, require
from app.batch.outputs import iter_rows, read_rows
from app.config.settings import Settings
from app.engine.facade import Engine
from app.engine.predictor import Predictor
from app.serve import cli
from tests.support.batch_images import BAD, write_image_folder, write_tiny_repository
from tests.support.inprocess import ClientFactory

FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def batch(repository: Path, *args: str) -> int:
    """`vit-serve batch ... ARGS` in this process; its exit status."""
    with pytest.raises(SystemExit) as ended:
        cli.main(["batch", "--model", "tiny", "--model-repository", str(repository), "--no-progress", *args])
    return int(ended.value.code or 0)


async def server_answers(repository: Path, files: list[Path], serve: ClientFactory) -> dict[str, dict[str, Any]]:
    """`/v1/classify`'s answer (with logits) for each readable file, from the real app in this process."""
    answers = {}
    settings = Settings(model_repository=repository, model=["tiny"], device="cpu")
    async with serve(Engine.load(settings)) as client:
        for path in files:
            if path.is_symlink():
                continue
            response = await client.post(
                "/v1/classify",
                content=path.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
                params={"logits": "true"},
            )
            answers[str(path)] = response.json()
    return answers


def assert_rows_are_the_servers(rows: dict[str, dict[str, Any]], answers: dict[str, dict[str, Any]]) -> None:
    for path, row in rows.items():
        if Path(path).name in BAD:
            assert row["top_k"] is None and row["error"], path
            assert row["error_code"] == ("unreadable" if Path(path).is_symlink() else answers[path]["code"]), path
            continue
        assert row["error"] is None and row["error_code"] is None, (path, row["error"])
        prediction = answers[path]["predictions"][0]
        np.testing.assert_allclose(row["logits"], prediction["logits"], atol=FP32_ATOL, err_msg=path)
        top_k = prediction["top_k"]
        assert [c["index"] for c in row["top_k"]] == [c["index"] for c in top_k], path
        scores = [c["score"] for c in row["top_k"]]
        np.testing.assert_allclose(scores, [c["score"] for c in top_k], atol=FP32_ATOL)
        assert row["model"] == "tiny"


async def test_a_folder_gives_a_row_per_image_with_the_servers_logits_and_bad_files_as_failed_rows(
    repository: Path, folder: list[Path], tmp_path: Path, serve: ClientFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    root = folder[0].parent.parent
    assert batch(repository, str(root), "--output", str(tmp_path / "rows"), "--logits") == 1  # some failed
    assert batch(repository, str(root), "--output", str(tmp_path / "rows.jsonl"), "--logits") == 1
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith(f"{len(folder)} images: {len(folder) - len(BAD)} classified, {len(BAD)} failed (")
    parquet = list(iter_rows(tmp_path / "rows"))
    assert [row["path"] for row in parquet] == [str(p) for p in folder]  # one row per input, in order
    assert list(iter_rows(tmp_path / "rows.jsonl")) == parquet  # both outputs hold the same rows
    assert_rows_are_the_servers(read_rows(tmp_path / "rows"), await server_answers(repository, folder, serve))
    (part,) = (tmp_path / "rows").glob("*.parquet")
    assert pq.read_schema(part).field("top_k").type == pa.list_(
        pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float64())])
    )


def test_resume_redoes_only_the_failed_and_new_images(
    repository: Path, folder: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for path in folder:
        if not path.is_symlink():
            (root / path.name).write_bytes(path.read_bytes())
    output = tmp_path / "rows"
    predictors: list[Predictor] = []

    class Counted(Predictor):
        def __init__(self, settings: Settings, model: str | None = None) -> None:
            super().__init__(settings, model)
            predictors.append(self)

    monkeypatch.setattr(local, "Predictor", Counted)
    assert batch(repository, str(root), "--output", str(output)) == 1
    failed = {path for path, row in read_rows(output).items() if row["error"]}
    assert len(failed) == len(BAD) - 1  # the broken link was not copied
    (root / "notes.png").write_bytes((root / "000.png").read_bytes())  # fixed
    (root / "new.png").write_bytes((root / "005.png").read_bytes())  # added
    assert batch(repository, str(root), "--output", str(output)) == 2  # refused: the output holds rows
    assert batch(repository, str(root), "--output", str(output), "--resume") == 1  # the other bad ones fail again
    assert [p.images_processed for p in predictors] == [len(folder) - 1, len(failed) + 1]
    rows = read_rows(output)
    assert len(rows) == len(folder)  # every input once more, the new one included
    assert rows[str(root / "notes.png")]["error"] is None and rows[str(root / "new.png")]["error"] is None
    assert {path for path, row in rows.items() if row["error"]} == failed - {str(root / "notes.png")}
    assert batch(repository, str(root), "--output", str(output), "--resume") == 1
    assert predictors[-1].images_processed == len(failed) - 1  # only the ones still failing


def test_globs_and_listings_name_the_inputs(repository: Path, folder: list[Path], tmp_path: Path) -> None:
    listed = [str(p) for p in folder[:5]]
    with (tmp_path / "listing.csv").open("w", newline="") as stream:
        csv.writer(stream).writerows([["path", "note"], *([path, "x"] for path in listed)])
    pq.write_table(pa.table({"path": [str(folder[5])]}), tmp_path / "listing.parquet")
    pattern = str(folder[0].parent / "01*.png")
    output = tmp_path / "rows.jsonl"
    arguments = [str(tmp_path / "listing.csv"), str(tmp_path / "listing.parquet"), pattern]
    assert batch(repository, *arguments, "--output", str(output), "--top-k", "2") == 0
    globbed = sorted(str(p) for p in folder[0].parent.glob("01*.png"))
    rows = list(iter_rows(output))
    assert [r["path"] for r in rows] == list(dict.fromkeys([*listed, str(folder[5]), *globbed]))
    assert all(len(r["top_k"]) == 2 and "logits" not in r for r in rows)


def test_urls_are_listed_and_read_through_fsspec(repository: Path, folder: list[Path], tmp_path: Path) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    good, bad = folder[0], next(p for p in folder if p.name == "notes.png")
    memory.pipe({"/bucket/photos/good.png": good.read_bytes(), "/bucket/photos/deeper/notes.png": bad.read_bytes()})
    memory.pipe("/bucket/photos/README.txt", b"not an image suffix")
    output = tmp_path / "rows.jsonl"
    try:
        assert batch(repository, "memory://bucket/photos/", "--output", str(output)) == 1
    finally:
        memory.rm("/bucket", recursive=True)
    rows = read_rows(output)
    assert sorted(rows) == ["memory:///bucket/photos/deeper/notes.png", "memory:///bucket/photos/good.png"]
    assert rows["memory:///bucket/photos/good.png"]["error"] is None
    assert rows["memory:///bucket/photos/deeper/notes.png"]["error_code"] == "unsupported_image_format"


def test_what_stops_a_job_before_it_starts_is_one_line(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    output = tmp_path / "rows"
    assert batch(repository, str(tmp_path / "nothing"), "--output", str(output)) == 2
    assert batch(repository, str(image), "--output", str(output), "--top-k", "11") == 2
    assert batch(repository, str(image), "--output", str(output), "--model", "absent") == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if "->" not in line]
    assert errors[0] == f"vit-serve batch: no such file or folder: {tmp_path / 'nothing'}"
    assert errors[1] == "vit-serve batch: top_k must be between 1 and 10, not 11"
    assert errors[2].startswith("vit-serve batch: model 'absent'")
    assert not output.exists()  # nothing written
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    with pytest.raises(MissingExtra, match=r"pip install 'vit-serve\[ray\]'"):
        require("ray", "Ray Data")
    assert batch(repository, str(image), "--output", str(output), "--engine", "ray") == 2
    assert "pip install 'vit-serve[ray]'" in capsys.readouterr().err
