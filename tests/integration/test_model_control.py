"""Several models in one process, and loading, reloading and unloading them while serving (`model_control`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from pydantic import SecretStr, ValidationError
from tritonclient.utils import InferenceServerException

from app.config.settings import Settings
from app.engine.facade import Engine
from tests.support.fakes import tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.photos import photo_jpegs
from tests.support.processes import tiny_server_process
from tests.support.waiting import wait_until

KEY = "control-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def jpeg() -> bytes:
    return photo_jpegs()["chelsea"]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_model_folder(tmp_path, "first", tiny_vit(seed=1))
    write_model_folder(tmp_path, "second", tiny_vit(seed=2, num_classes=4), labels=["cat", "dog", "bird", "fish"])
    write_model_folder(tmp_path, "third", tiny_vit(seed=3, num_classes=3), labels=["red", "green", "blue"])
    return tmp_path


def control_settings(repository: Path, **changes: object) -> Settings:
    return Settings(
        model_repository=repository,
        model=["first", "second"],
        model_control=True,
        api_keys=[SecretStr(KEY)],
        drain_timeout_s=10,
        **changes,  # type: ignore[arg-type]
    )


async def classify(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post(
        f"/v1/models/{model}/classify", content=jpeg(), headers={**AUTH, "Content-Type": "image/jpeg"}
    )


async def test_two_models_with_their_own_labels_and_batchers_and_a_third_loaded_and_unloaded_at_run_time(
    repository: Path,
) -> None:
    settings = control_settings(repository)
    engine = Engine.load(settings)
    async with serve_in_process(engine, settings) as client:
        listed = (await client.get("/v1/models", headers=AUTH)).json()
        assert listed["default"] == "first" and [m["name"] for m in listed["models"]] == ["first", "second"]
        second = await classify(client, "second")
        assert {c["label"] for c in second.json()["predictions"][0]["top_k"]} <= {"cat", "dog", "bird", "fish"}
        assert engine.model("first").batcher is not engine.model("second").batcher
        assert (await classify(client, "third")).status_code == 404

        loaded = await client.post("/v1/models/third/load", headers=AUTH)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["name"] == "third" and loaded.json()["ready"] is True
        third = await classify(client, "third")
        assert third.status_code == 200
        assert [c["label"] for c in third.json()["predictions"][0]["top_k"]] != []
        assert {c["label"] for c in third.json()["predictions"][0]["top_k"]} == {"red", "green", "blue"}
        listed = (await client.get("/v1/models", headers=AUTH)).json()
        assert [m["name"] for m in listed["models"]] == ["first", "second", "third"]
        oip_index = (await client.post("/v2/repository/index", headers=AUTH)).json()
        assert [(m["name"], m["state"]) for m in oip_index] == [
            ("first", "READY"),
            ("second", "READY"),
            ("third", "READY"),
        ]
        metrics = (await client.get("/metrics", headers=AUTH)).text
        assert 'vit_model_ready{model="third"} 1.0' in metrics

        unloaded = await client.post("/v1/models/third/unload", headers=AUTH)
        assert unloaded.json() == {"name": "third", "unloaded": True}
        gone = await classify(client, "third")
        assert (gone.status_code, gone.json()["code"]) == (404, "model_not_found")
        assert (await classify(client, "first")).status_code == 200  # the others go on
        metrics = (await client.get("/metrics", headers=AUTH)).text
        assert 'vit_model_ready{model="third"}' not in metrics and 'vit_images_total{model="third"} 1.0' in metrics
        ready_only = (await client.post("/v2/repository/index", headers=AUTH, json={"ready": True})).json()
        assert [m["name"] for m in ready_only] == ["first", "second"]

        # Through OIP's repository extension, as tritonclient calls it.
        assert (await client.post("/v2/repository/models/third/load", headers=AUTH)).status_code == 200
        assert (await client.get("/v2/models/third/ready", headers=AUTH)).status_code == 200
        assert (await client.post("/v2/repository/models/third/unload", headers=AUTH)).status_code == 200
        assert (await client.get("/v2/models/third/ready", headers=AUTH)).status_code == 404
        assert "model_repository" in (await client.get("/v2", headers=AUTH)).json()["extensions"]


async def test_a_reload_swaps_the_model_and_loses_no_request(repository: Path) -> None:
    """Requests keep coming while `first` is reloaded with new weights: every one is answered, those the old model
    accepted by the old weights, the rest by the new."""
    settings = control_settings(repository, max_queue_delay_ms=1)
    engine = Engine.load(settings)
    async with serve_in_process(engine, settings) as client:
        old_logits = (await classify(client, "first")).json()["predictions"][0]["logits"]
        write_model_folder(repository, "first", tiny_vit(seed=9))  # new weights on disk
        stop = asyncio.Event()
        answers: list[httpx.Response] = []

        async def keep_classifying() -> None:
            while not stop.is_set():
                answers.append(await classify(client, "first"))

        senders = [asyncio.create_task(keep_classifying()) for _ in range(4)]
        await wait_until(lambda: len(answers) >= 8)  # the stream is flowing before the reload
        old = engine.model("first")
        reloaded = await client.post("/v1/models/first/load", headers=AUTH)
        answered_at_reload = len(answers)
        await wait_until(lambda: len(answers) >= answered_at_reload + 8)  # and goes on after it
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*senders)
    assert reloaded.status_code == 200, reloaded.text
    assert engine.model("first") is not old and not old.ready
    assert answers and [r.status_code for r in answers] == [200] * len(answers)
    new_logits = answers[-1].json()["predictions"][0]["logits"]
    assert not np.allclose(old_logits, new_logits)
    kinds = set()
    for response in answers:  # each answer is the old model's or the new one's, never anything else
        logits = response.json()["predictions"][0]["logits"]
        kind = "old" if np.allclose(logits, old_logits, atol=1e-5) else "new"
        assert kind == "old" or np.allclose(logits, new_logits, atol=1e-5)
        kinds.add(kind)
    assert kinds == {"old", "new"}
    assert old.batcher.stats.images > 0 and old.batcher.depth == 0  # the old model drained what it had accepted


async def test_control_errors_are_clear_and_change_nothing(repository: Path) -> None:
    settings = control_settings(repository)
    broken_folder = write_model_folder(repository, "broken", tiny_vit())
    (broken_folder / "weights.pth").unlink()  # its model.toml names a weights file that is not there
    async with serve_in_process(Engine.load(settings), settings) as client:
        no_key = await client.post("/v1/models/third/load")
        assert no_key.status_code == 401
        missing = await client.post("/v1/models/nothere/load", headers=AUTH)
        assert (missing.status_code, missing.json()["code"]) == (404, "model_not_found")
        traversal = await client.post("/v1/models/..%2Ffirst/load", headers=AUTH)
        assert traversal.status_code == 404
        broken = await client.post("/v1/models/broken/load", headers=AUTH)
        assert (broken.status_code, broken.json()["code"]) == (400, "model_load_failed")
        assert "weights file" in broken.json()["error"] and "not found" in broken.json()["error"]
        default = await client.post("/v1/models/first/unload", headers=AUTH)
        assert (default.status_code, default.json()["code"]) == (409, "conflict")
        not_served = await client.post("/v1/models/third/unload", headers=AUTH)
        assert not_served.status_code == 404
        with_parameters = await client.post(
            "/v2/repository/models/third/load", headers=AUTH, json={"parameters": {"config": "{}"}}
        )
        assert with_parameters.status_code == 400
        listed = (await client.get("/v1/models", headers=AUTH)).json()
        assert [m["name"] for m in listed["models"]] == ["first", "second"]
        assert (await classify(client, "first")).status_code == 200


async def test_model_control_is_off_by_default_and_needs_a_key_and_one_worker(repository: Path) -> None:
    settings = Settings(model_repository=repository, model=["first"])
    async with serve_in_process(Engine.load(settings), settings) as client:
        refused = await client.post("/v1/models/third/load")
        assert (refused.status_code, refused.json()["code"]) == (403, "model_control_off")
        assert (await client.post("/v2/repository/index")).status_code == 403
        assert "model_repository" not in (await client.get("/v2")).json()["extensions"]
    with pytest.raises(ValidationError, match="model_control needs api_keys"):
        Settings(model_control=True)
    with pytest.raises(ValidationError, match="model_control needs workers = 1"):
        Settings(model_control=True, api_keys=[SecretStr(KEY)], workers=2)


@pytest.mark.slow
def test_tritonclient_loads_and_unloads_through_the_repository_extension(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "third", tiny_vit(seed=3, num_classes=3), labels=["red", "green", "blue"])
    with tiny_server_process(tmp_path, "--model-control", "--api-keys", KEY) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        index = client.get_model_repository_index(headers=AUTH)
        assert [(m["name"], m["state"]) for m in index] == [("third", "UNAVAILABLE"), ("tiny", "READY")]
        assert not client.is_model_ready("third", headers=AUTH)
        client.load_model("third", headers=AUTH)
        assert client.is_model_ready("third", headers=AUTH)
        image = triton.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([jpeg()], dtype=object).reshape(-1, 1), binary_data=True)
        result = client.infer(
            "third", [image], outputs=[triton.InferRequestedOutput("LOGITS", class_count=3)], headers=AUTH
        )
        assert {row.decode().rsplit(":", 1)[1] for row in result.as_numpy("LOGITS")[0]} == {"red", "green", "blue"}
        client.unload_model("third", headers=AUTH)
        assert not client.is_model_ready("third", headers=AUTH)
        with pytest.raises(InferenceServerException, match="needs an API key"):
            client.load_model("third")  # no key
