"""Backends: onnxruntime and openvino (fp32, int8, bf16) against torch fp32 over HTTP on real photographs, the accuracy
gate that refuses a broken fast path at start, the export cache, the one-line refusals, and `vit-serve verify`.

One tiny ViT is exported once for the module (its cache under a temporary folder) and every start after that reads it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime.quantization
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.config.model_config import AccuracyGate
from app.config.settings import Settings
from app.engine.accuracy_gate import AccuracyGateFailed
from app.engine.facade import Engine
from app.engine.loading import ModelLoader, export_cache
from app.errors import ModelLoadError
from app.runtime.backends import onnx_export
from app.runtime.backends.onnxruntime_backend import OnnxRuntimeForward
from app.runtime.backends.openvino_backend import OpenVinoBackend
from app.serve import cli
from tests.support.fakes import tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.photos import photo_jpegs

SIZE = 32
CLASSES = 10
EMBEDDING = 32  # tiny_vit's hidden_dim
RUNTIMES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class Repository:
    root: Path
    weights_cache: Path
    photos: dict[str, bytes]

    @property
    def exports(self) -> Path:
        return export_cache(self.weights_cache)

    def settings(self, model: str = "tiny", **changes: Any) -> Settings:
        return Settings(
            model_repository=self.root,
            model=[model],
            weights_cache_dir=self.weights_cache,
            max_batch_size=4,
            max_queue_delay_ms=2,
            **changes,
        )

    def onnx_files(self) -> set[str]:
        return {path.name for path in self.exports.glob("*.onnx")}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """`tiny` (with the photographs as its calibration images), `other` (the same architecture, other weights) and
    `uncalibrated` (tiny's weights, no calibration/), sharing one weights cache."""
    root = tmp_path_factory.mktemp("models")
    photos = photo_jpegs()
    folder = write_model_folder(root, "tiny", tiny_vit(image_size=SIZE, num_classes=CLASSES))
    calibration = folder / "calibration"
    calibration.mkdir()
    for name, data in photos.items():
        (calibration / f"{name}.jpg").write_bytes(data)
    write_model_folder(root, "other", tiny_vit(image_size=SIZE, num_classes=CLASSES, seed=1))
    write_model_folder(root, "uncalibrated", tiny_vit(image_size=SIZE, num_classes=CLASSES))
    return Repository(root, tmp_path_factory.mktemp("weights"), photos)


@pytest.fixture(scope="module")
def tiny_export(repository: Repository) -> Path:
    """tiny's fp32 ONNX export, made by its first start on a runtime: the only file in the cache then."""
    ModelLoader(repository.settings(backend="onnxruntime"))("tiny").warm_up()
    (name,) = repository.onnx_files()
    return repository.exports / name


@pytest.fixture(scope="module")
def other_export(repository: Repository, tiny_export: Path) -> Path:
    """other's fp32 export, beside tiny's: its weights differ, so does its key."""
    before = repository.onnx_files()
    ModelLoader(repository.settings("other", backend="onnxruntime"))("other").warm_up()
    (name,) = repository.onnx_files() - before
    return repository.exports / name


@dataclass(frozen=True)
class Served:
    info: dict[str, Any]
    logits: np.ndarray  # (n, classes), /v1/classify
    embeddings: np.ndarray  # (n, embedding), /v1/embed
    oip_logits: np.ndarray  # (n, classes), /v2/models/tiny/infer
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def served(settings: Settings, photos: dict[str, bytes]) -> Served:
    """Every photograph classified, embedded and inferred (OIP v2) by the in-process app, its description and
    metrics."""
    images = list(photos.values())
    files = [("image", (f"{name}.jpg", data, "image/jpeg")) for name, data in photos.items()]
    oip = {
        "inputs": [
            {
                "name": "IMAGE",
                "shape": [len(images), 1],
                "datatype": "BYTES",
                "data": [base64.b64encode(data).decode() for data in images],
                "parameters": {"content_type": "base64"},
            }
        ],
        "outputs": [{"name": "LOGITS"}],
    }
    async with serve_in_process(Engine.load(settings), settings) as client:
        classified = await client.post("/v1/classify", files=files, params={"logits": "true"})
        embedded = await client.post("/v1/embed", files=files)
        inferred = await client.post("/v2/models/tiny/infer", json=oip)
        info = await client.get("/v1/models/tiny")
        metrics = await client.get("/metrics")
    for response in (classified, embedded, inferred, info, metrics):
        assert response.status_code == 200, response.text
    (output,) = inferred.json()["outputs"]
    assert (output["name"], output["shape"]) == ("LOGITS", [len(images), CLASSES])
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    return Served(
        info=info.json(),
        logits=np.array([p["logits"] for p in classified.json()["predictions"]], dtype=np.float32),
        embeddings=np.array(embedded.json()["embeddings"], dtype=np.float32),
        oip_logits=np.array(output["data"], dtype=np.float32).reshape(len(images), CLASSES),
        metrics=samples,
    )


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference over all images, relative to the largest |value| expected."""
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def gate_metric(served: Served, path: str, measure: str) -> float:
    return served.metrics[("vit_accuracy_gate", (("measure", measure), ("model", "tiny"), ("path", path)))]


@pytest.fixture(scope="module")
def torch_fp32(repository: Repository) -> Served:
    """The exact path's answers, served by backend torch in fp32: the reference (its own event loop, once)."""
    return asyncio.run(served(repository.settings(), repository.photos))


# -- fp32 on each runtime: the same answers as torch ---------------------------------------------------------------


@pytest.mark.parametrize("backend", RUNTIMES)
async def test_a_runtime_in_fp32_serves_torchs_logits_and_embeddings_on_real_photographs(
    repository: Repository, tiny_export: Path, torch_fp32: Served, backend: str
) -> None:
    exported = repository.onnx_files()
    fast = await served(repository.settings(backend=backend), repository.photos)

    assert torch_fp32.info["accuracy_gate"] is None and torch_fp32.info["acceleration"]["fast_path"] is None
    assert relative_error(fast.logits, torch_fp32.logits) < 1e-4
    assert relative_error(fast.embeddings, torch_fp32.embeddings) < 1e-4
    assert fast.embeddings.shape == (len(repository.photos), EMBEDDING)
    np.testing.assert_allclose(fast.oip_logits, fast.logits, rtol=0, atol=1e-6)  # OIP v2: the same forward
    assert len({tuple(np.round(row, 3)) for row in fast.logits}) == len(repository.photos)  # each its own answer

    acceleration = fast.info["acceleration"]
    assert (acceleration["backend"], acceleration["precision"], acceleration["fast_path"]) == (
        backend,
        "float",
        backend,
    )
    gate = fast.info["accuracy_gate"]
    assert (gate["path"], gate["source"], gate["images"]) == (backend, "calibration images", len(repository.photos))
    assert gate["passed"] and gate["top1_agreement"] == 1.0 and gate["top5_overlap"] == 1.0
    assert gate["max_relative_error"] < 1e-4
    for measure in ("top1_agreement", "top5_overlap", "max_relative_error", "mean_relative_error"):
        assert gate_metric(fast, backend, measure) == pytest.approx(gate[measure])
    assert tiny_export.name in exported and repository.onnx_files() == exported  # the cached export, not a new one


# -- int8 and bf16: quantised for real, within the gate's bounds ----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        pytest.param({"backend": "onnxruntime", "precision": "int8"}, "onnxruntime+int8", id="onnxruntime-int8"),
        pytest.param({"backend": "openvino", "precision": "int8"}, "openvino+int8", id="openvino-int8"),
        pytest.param({"backend": "openvino", "dtype": "bf16"}, "openvino+bf16", id="openvino-bf16"),
        pytest.param({"backend": "torch", "dtype": "fp16"}, "fp16", id="torch-fp16"),
    ],
)
async def test_reduced_precision_starts_within_the_gates_bounds_on_the_calibration_images(
    repository: Repository, tiny_export: Path, torch_fp32: Served, changes: dict[str, str], path: str
) -> None:
    fast = await served(repository.settings(**changes), repository.photos)

    acceleration = fast.info["acceleration"]
    assert (acceleration["backend"], acceleration["fast_path"]) == (changes["backend"], path)
    assert acceleration["precision"] == changes.get("precision", "float")
    gate = fast.info["accuracy_gate"]
    assert (gate["path"], gate["source"], gate["images"]) == (path, "calibration images", len(repository.photos))
    bound = AccuracyGate().min_top1_agreement
    assert gate["passed"] and gate["top1_agreement"] >= bound == 0.99
    assert gate_metric(fast, path, "top1_agreement") == gate["top1_agreement"]
    # What the gate measured is what is served: the same top-1 class as torch fp32 on every photograph.
    assert (fast.logits.argmax(axis=1) == torch_fp32.logits.argmax(axis=1)).all()
    assert relative_error(fast.logits, torch_fp32.logits) < 0.2  # measured: about 0.05 (int8), 0.01 (bf16, fp16)
    if "precision" in changes:
        assert gate["max_relative_error"] > 1e-3  # quantised for real: fp32 runtimes are within 1e-6
        assert any(name.endswith(".int8.onnx") for name in repository.onnx_files())


# -- a broken fast path never starts -------------------------------------------------------------------------------


def test_a_corrupt_cached_export_is_refused_by_the_gate_at_start(
    repository: Repository, tiny_export: Path, other_export: Path, tmp_path: Path
) -> None:
    """tiny's cached export replaced by other's graph (the same shapes, other weights), under tiny's file name."""
    weights = tmp_path / "weights"
    shutil.copytree(repository.weights_cache, weights)
    shutil.copyfile(other_export, export_cache(weights) / tiny_export.name)
    settings = Settings(model_repository=repository.root, model=["tiny"], weights_cache_dir=weights, backend="openvino")
    model = ModelLoader(settings)("tiny")

    with pytest.raises(AccuracyGateFailed) as caught:
        model.warm_up()

    message = str(caught.value)
    assert message.startswith(f"model 'tiny': accuracy gate: openvino against torch fp32 on {len(repository.photos)} ")
    assert "calibration images: top-1 agreement" in message and "< 0.99" in message and "\n" not in message
    assert isinstance(caught.value, ModelLoadError)
    assert model.agreement is not None and not model.agreement.passed


async def test_a_model_refused_by_the_gate_never_becomes_ready(
    repository: Repository, tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime fed its pixels in the wrong channel order (BGR), as a wrong normalisation would: the app's warm-up
    fails on the gate, and the model is not ready."""
    run = OnnxRuntimeForward.__call__
    monkeypatch.setattr(OnnxRuntimeForward, "__call__", lambda self, batch: run(self, batch.flip(1)))
    settings = repository.settings(backend="onnxruntime")
    engine = Engine.load(settings)

    with pytest.raises(AccuracyGateFailed, match=r"onnxruntime against torch fp32 .*: top-1 agreement"):
        async with serve_in_process(engine, settings):
            pass
    assert not engine.model("tiny").ready


# -- the export cache ----------------------------------------------------------------------------------------------


def test_a_second_start_reads_the_cached_exports_and_changed_weights_get_their_own(
    repository: Repository, tiny_export: Path, other_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ModelLoader(repository.settings(backend="onnxruntime", precision="int8"))("tiny").warm_up()  # int8 cached too
    cached = repository.onnx_files()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", refuse)
    for changes in ({"backend": "onnxruntime"}, {"backend": "openvino"}, {"backend": "openvino", "precision": "int8"}):
        model = ModelLoader(repository.settings(**changes))("tiny")
        model.warm_up()
        assert model.agreement is not None and model.agreement.passed
    # the same weights in another folder: the same export
    ModelLoader(repository.settings("uncalibrated", backend="onnxruntime"))("uncalibrated").warm_up()

    assert repository.onnx_files() == cached
    assert other_export.name != tiny_export.name and {other_export.name, tiny_export.name} <= cached


def test_a_cache_that_cannot_be_written_is_read_and_what_is_missing_is_made_in_a_temporary_folder(
    repository: Repository,
    tiny_export: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read-only cache (an image's baked-in exports) holding tiny's fp32 export alone: int8 reads that export and
    quantises it into a temporary folder, with a warning, writing nothing into the cache."""
    weights = tmp_path / "weights"
    shutil.copytree(repository.weights_cache, weights)
    for quantised in export_cache(weights).glob("*.int8.onnx"):
        quantised.unlink()
    before = sorted(export_cache(weights).iterdir())
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if weights in Path(path).parents else access(path, mode))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    settings = Settings(
        model_repository=repository.root,
        model=["tiny"],
        weights_cache_dir=weights,
        backend="openvino",
        precision="int8",
    )
    with caplog.at_level(logging.WARNING, logger=onnx_export.__name__):
        model = ModelLoader(settings)("tiny")
        model.warm_up()

    assert model.agreement is not None and model.agreement.passed
    assert sorted(export_cache(weights).iterdir()) == before
    assert any("cannot be written" in record.getMessage() for record in caplog.records)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """The command configures logging (a handler on this test's captured stderr): put back what was there."""
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


# -- refusals at start: one line each ------------------------------------------------------------------------------


@pytest.mark.usefixtures("restored_logging")
def test_a_backend_not_installed_is_refused_with_the_line_that_installs_it(
    repository: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "openvino" else find_spec(name, *args)
    )
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--model-repository", str(repository.root), "--model", "tiny", "--backend", "openvino"])
    message = str(caught.value.code)
    assert message == (
        "vit-serve: model 'tiny': backend openvino needs openvino, which is not installed: "
        "pip install 'vit-serve[openvino]'"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"backend": "onnxruntime", "dtype": "bf16"}, "backend onnxruntime computes in fp32", id="ort-bf16"
        ),
        pytest.param(
            {"backend": "onnxruntime", "dtype": "fp16"}, "backend onnxruntime computes in fp32", id="ort-fp16"
        ),
        pytest.param({"precision": "int8"}, "precision int8 runs on backend onnxruntime or openvino", id="torch-int8"),
    ],
)
def test_what_a_backend_cannot_run_is_refused_before_the_weights_are_read(
    repository: Repository, changes: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.engine import loading

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read")

    monkeypatch.setattr(loading, "load_model", never)
    with pytest.raises(ModelLoadError) as caught:
        ModelLoader(repository.settings(**changes))("tiny")
    message = str(caught.value)
    assert message.startswith(f"model 'tiny': {expected}") and "\n" not in message


def test_openvino_refuses_a_gpu() -> None:
    with pytest.raises(ModelLoadError, match=r"^backend openvino runs on the CPU, not on cuda: set device cpu"):
        OpenVinoBackend().check(torch.device("cuda"), torch.float32, "float")
    OpenVinoBackend().check(torch.device("cpu"), torch.bfloat16, "int8")  # what it can run passes


def test_int8_without_calibration_images_is_refused_naming_the_folder(
    repository: Repository, tiny_export: Path
) -> None:
    model = ModelLoader(repository.settings("uncalibrated", backend="openvino", precision="int8"))("uncalibrated")
    with pytest.raises(ModelLoadError) as caught:
        model.warm_up()
    message = str(caught.value)
    assert message.startswith("model 'uncalibrated': precision int8 needs calibration images in ")
    assert str(repository.root / "uncalibrated" / "calibration") in message and "\n" not in message


# -- vit-serve verify ----------------------------------------------------------------------------------------------


def verify(repository: Repository, *args: str, root: Path | None = None) -> int | str | None:
    """`vit-serve verify ARGS` on the repository (or `root`) with the module's weights cache: its exit status."""
    folder = str(root or repository.root)
    with pytest.raises(SystemExit) as caught:
        cli.main(["verify", *args, "--model-repository", folder, "--weights-cache-dir", str(repository.weights_cache)])
    return caught.value.code


@pytest.mark.usefixtures("restored_logging")
def test_verify_prints_the_gates_table_and_passes(
    repository: Repository, tiny_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(repository, "tiny", "--backend", "openvino") == 0
    out = capsys.readouterr().out.splitlines()
    photos = len(repository.photos)
    assert out[0] == f"model 'tiny': openvino against torch fp32 on {photos} calibration images"
    assert out[2].split() == ["top-1", "agreement", "1", ">=", "0.99", "ok"]
    assert out[3].split() == ["top-5", "overlap", "1", "-"]
    assert out[-1] == "passed" and "MISSED" not in "\n".join(out)

    chosen = [repository.root / "tiny" / "calibration" / "chelsea.jpg", repository.root / "tiny" / "calibration"]
    assert verify(repository, "tiny", *map(str, chosen), "--backend", "onnxruntime") == 0
    assert capsys.readouterr().out.startswith(
        f"model 'tiny': onnxruntime against torch fp32 on {photos + 1} given images\n"
    )


@pytest.mark.usefixtures("restored_logging")
def test_verify_exits_1_below_the_bounds_and_2_when_the_model_cannot_load(
    repository: Repository, tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strict = 'backend = "openvino"\n[accuracy_gate]\nmax_relative_error = 0\n'
    write_model_folder(tmp_path, "strict", tiny_vit(image_size=SIZE, num_classes=CLASSES), extra=strict)
    assert verify(repository, "strict", root=tmp_path) == 1
    out = capsys.readouterr().out
    (missed,) = [line for line in out.splitlines() if line.startswith("max relative logit error")]
    assert missed.split()[-3:] == ["<=", "0", "MISSED"]
    assert "built-in photographs" in out  # no calibration/: the photographs the service ships
    assert out.splitlines()[-1] == "FAILED: the server would refuse to start this model"

    assert verify(repository, "missing", "--backend", "openvino") == 2
    assert capsys.readouterr().err.startswith("vit-serve verify: model 'missing': ")
    assert verify(repository, "tiny", str(tmp_path / "no-such-folder")) == 2
    assert capsys.readouterr().err == f"vit-serve verify: no such file or folder: {tmp_path / 'no-such-folder'}\n"


# -- explanations stay on torch ------------------------------------------------------------------------------------


async def test_explanations_run_on_torch_beside_a_runtime(repository: Repository, tiny_export: Path) -> None:
    settings = repository.settings(backend="openvino")
    chelsea = repository.photos["chelsea"]
    async with serve_in_process(Engine.load(settings), settings) as client:
        explained = await client.post("/v1/explain", content=chelsea, params={"top_k": 1})
        classified = await client.post("/v1/classify", content=chelsea, params={"top_k": 1})
        info = (await client.get("/v1/models/tiny")).json()
    assert explained.status_code == 200, explained.text
    assert info["acceleration"]["explain_backend"] == "torch" and info["acceleration"]["backend"] == "openvino"
    (explanation,) = explained.json()["explanations"]
    assert explanation["top_k"][0]["index"] == classified.json()["predictions"][0]["top_k"][0]["index"]
