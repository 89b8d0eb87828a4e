"""The accuracy gate's arithmetic: agreement figures from two sets of logits, the bounds they miss, the refusal and
`vit-serve verify`'s table; which images it runs on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from app.config.model_config import AccuracyGate
from app.engine.accuracy_gate import (
    BUILT_IN,
    CALIBRATION,
    PHOTOS,
    AccuracyGateFailed,
    compare,
    enforce,
    gate_images,
    shortfalls,
    table,
)
from app.engine.descriptions import Agreement
from app.errors import ModelLoadError

EXACT = torch.tensor(
    [
        [8.0, 4.0, 2.0, 1.0, 0.5, 0.0, -1.0],  # top-1 0, top-5 {0, 1, 2, 3, 4}
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0],  # top-1 6, top-5 {2, 3, 4, 5, 6}
        [1.0, -2.0, 0.0, -4.0, 0.0, 0.0, 0.0],  # top-1 0 (|logit| max 4)
        [0.1, 0.2, 0.3, 0.4, 0.5, 2.0, 0.6],  # top-1 5
    ]
)


def test_identical_logits_agree_fully_and_pass() -> None:
    agreement = compare("openvino", CALIBRATION, EXACT, EXACT.clone(), AccuracyGate())
    assert agreement == Agreement(
        path="openvino",
        images=4,
        source=CALIBRATION,
        top1_agreement=1.0,
        top5_overlap=1.0,
        max_relative_error=0.0,
        mean_relative_error=0.0,
        passed=True,
    )


def test_figures_count_top1_flips_top5_overlap_and_errors_relative_to_each_images_largest_logit() -> None:
    fast = EXACT.clone()
    fast[0, 1] = 9.0  # image 0: top-1 becomes 1 (error 5 of 8); top-5 the same set
    fast[1, 0] = 4.5  # image 1: 0 enters the top-5 in place of 2 (error 4.5 of 10)
    fast[2, 1] = -1.0  # image 2: error 1 of 4, top-1 unchanged
    agreement = compare("onnxruntime+int8", BUILT_IN, EXACT, fast, AccuracyGate())
    assert agreement.top1_agreement == 0.75  # 3 of 4
    assert agreement.top5_overlap == pytest.approx((1 + 0.8 + 1 + 1) / 4)
    assert agreement.max_relative_error == pytest.approx(5 / 8)
    assert agreement.mean_relative_error == pytest.approx((5 / 8 + 4.5 / 10 + 1 / 4 + 0) / 4)
    assert not agreement.passed  # 0.75 < 0.99, the default bound


def test_fewer_than_five_classes_compare_all_of_them() -> None:
    exact = torch.tensor([[3.0, 1.0, 2.0]])
    agreement = compare("bf16", BUILT_IN, exact, torch.tensor([[3.0, 2.0, 1.0]]), AccuracyGate())
    assert (agreement.top1_agreement, agreement.top5_overlap) == (1.0, 1.0)


def test_an_all_zero_exact_image_does_not_divide_by_zero() -> None:
    agreement = compare("bf16", BUILT_IN, torch.zeros(1, 6), torch.zeros(1, 6), AccuracyGate())
    assert agreement.max_relative_error == 0.0 and agreement.passed


AGREEMENT = Agreement(
    path="openvino+int8",
    images=64,
    source=CALIBRATION,
    top1_agreement=0.96875,
    top5_overlap=0.9,
    max_relative_error=0.08,
    mean_relative_error=0.02,
)


def test_shortfalls_name_each_bound_missed_and_only_set_bounds_are_enforced() -> None:
    assert shortfalls(AGREEMENT, AccuracyGate()) == ["top-1 agreement 0.9688 < 0.99"]
    assert shortfalls(AGREEMENT, AccuracyGate(min_top1_agreement=0.95)) == []
    strict = AccuracyGate(
        min_top1_agreement=0.9, min_top5_overlap=0.95, max_relative_error=0.05, max_mean_relative_error=0.01
    )
    assert shortfalls(AGREEMENT, strict) == [
        "top-5 overlap 0.9 < 0.95",
        "max relative logit error 0.08 > 0.05",
        "mean relative logit error 0.02 > 0.01",
    ]
    at_the_bounds = AccuracyGate(
        min_top1_agreement=0.96875, min_top5_overlap=0.9, max_relative_error=0.08, max_mean_relative_error=0.02
    )
    assert shortfalls(AGREEMENT, at_the_bounds) == []  # a bound met exactly is met


def test_enforce_refuses_with_one_line_naming_the_path_images_and_bounds_missed() -> None:
    enforce("vit", AGREEMENT, AccuracyGate(min_top1_agreement=0.9))  # met: nothing raised
    with pytest.raises(AccuracyGateFailed) as caught:
        enforce("vit", AGREEMENT, AccuracyGate(max_relative_error=0.05))
    assert isinstance(caught.value, ModelLoadError)  # a start-up failure like any other
    assert str(caught.value) == (
        "model 'vit': accuracy gate: openvino+int8 against torch fp32 on 64 calibration images: "
        "top-1 agreement 0.9688 < 0.99; max relative logit error 0.08 > 0.05 (bounds: [accuracy_gate] in model.toml)"
    )


def test_the_table_shows_every_measure_its_bound_and_verdict() -> None:
    bounds = AccuracyGate(min_top1_agreement=0.95, max_relative_error=0.05)
    agreement = dataclasses.replace(AGREEMENT, passed=not shortfalls(AGREEMENT, bounds))
    lines = table("vit", agreement, bounds).splitlines()
    assert lines[0] == "model 'vit': openvino+int8 against torch fp32 on 64 calibration images"
    assert lines[1].split() == ["measure", "value", "bound"]
    assert [line.split()[-3:] for line in lines[2:6]] == [
        [">=", "0.95", "ok"],
        ["overlap", "0.9", "-"],  # no bound: shown, not judged
        ["<=", "0.05", "MISSED"],
        ["error", "0.02", "-"],
    ]
    assert lines[-1] == "FAILED: the server would refuse to start this model"
    passing = dataclasses.replace(AGREEMENT, passed=True)
    assert table("vit", passing, AccuracyGate(min_top1_agreement=0.9)).splitlines()[-1] == "passed"


def test_the_gate_reads_the_calibration_images_else_the_built_in_photographs(tmp_path: Path) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) >= 8
    images, source = gate_images(tmp_path / "missing", 64)
    assert source == BUILT_IN and images == [photo.read_bytes() for photo in photos]
    assert len(gate_images(None, 3)[0]) == 3  # at most `images` of them

    (tmp_path / "b.png").write_bytes(b"b")
    (tmp_path / "a.JPG").write_bytes(b"a")
    (tmp_path / "notes.txt").write_bytes(b"not an image")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "c.jpg").write_bytes(b"c")
    assert gate_images(tmp_path, 64) == ([b"a", b"b"], CALIBRATION)  # by name; images only; not sub-folders
