"""`vit-serve download`: pretrained weights fetched into the cache that start-up reads, or one line saying why not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.serve import cli
from tests.support.fakes import tiny_vit, write_model_folder

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models"


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """torch.hub's download replaced by one that writes a small state_dict and records (url, hash prefix)."""
    calls: list[tuple[str, str | None]] = []

    def download_url_to_file(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, hash_prefix))
        torch.save({"weight": torch.zeros(2)}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    return calls


def test_download_fetches_into_the_cache_once_with_the_hash_checked(
    tmp_path: Path, fetched: list[tuple[str, str | None]], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["download", "vit_b_32", "--model-repository", str(SHIPPED), "--weights-cache-dir", str(tmp_path)]
    cli.main(args)
    file = tmp_path / "vit_b_32-d86f8d99.pth"
    assert fetched == [("https://download.pytorch.org/models/vit_b_32-d86f8d99.pth", "d86f8d99")]
    assert file.is_file()
    assert capsys.readouterr().out.endswith(f"\nvit_b_32: vit_b_32.IMAGENET1K_V1 in {file}\n")
    cli.main(args)  # start-up goes through the same code: a cached file is read, never fetched again
    assert len(fetched) == 1


def test_download_takes_the_models_that_serve_would_load(
    tmp_path: Path, fetched: list[tuple[str, str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIT_MODEL", "vit_b_16, vit_l_16")
    monkeypatch.setenv("VIT_WEIGHTS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VIT_MODEL_REPOSITORY", str(SHIPPED))
    cli.main(["download"])
    assert [url.rsplit("/", 1)[1] for url, _ in fetched] == ["vit_b_16-c867db91.pth", "vit_l_16-852ce7e3.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit_b_16-c867db91.pth", "vit_l_16-852ce7e3.pth"]


def test_local_weights_need_no_download(
    tmp_path: Path, fetched: list[tuple[str, str | None]], capsys: pytest.CaptureFixture[str]
) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit())
    cli.main(["download", "tiny", "--model-repository", str(tmp_path)])
    assert fetched == []
    assert capsys.readouterr().out == "tiny: weights 'weights.pth' need no download\n"


def test_without_network_download_fails_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An address that refuses at once, so the test never depends on this machine's network.
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as caught:
        cli.main(["download", "vit_b_32", "--model-repository", str(SHIPPED), "--weights-cache-dir", str(cache)])
    message = str(caught.value.code)
    assert message.startswith("vit-serve: model 'vit_b_32': cannot download pretrained weights vit_b_32.IMAGENET1K_V1")
    assert "\n" not in message
    assert list(cache.iterdir()) == []  # no partial file left for start-up to trip over


def test_an_unknown_model_fails_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["download", "nothing", "--model-repository", str(SHIPPED)])
    assert str(caught.value.code).startswith("vit-serve: model 'nothing': no ")
