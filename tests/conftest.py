"""Fixtures for every tier. Nothing of the app (nor torch) is imported here at collection: the fast tier
(`tests/unit`) pays only for what its own tests import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import httpx

    from tests.support.inprocess import ClientFactory


@pytest.fixture
def serve() -> ClientFactory:
    """`async with serve(engine, settings) as client`: the real app in this process (tests/support/inprocess.py)."""
    from tests.support.inprocess import serve_in_process

    return serve_in_process


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app serving the deterministic fake model."""
    from tests.support.fakes import fake_engine
    from tests.support.inprocess import serve_in_process

    async with serve_in_process(fake_engine()) as client:
        yield client


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a process is marked `slow` (`pytest -m "not slow"` is the quick loop): enforced here."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import subprocess

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
