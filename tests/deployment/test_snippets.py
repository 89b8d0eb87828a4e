"""Every shell and Python snippet of README.md and docs/ runs, as written, against real server processes, so a wrong
snippet fails the suite.

A fenced `bash`/`sh`/`shell`/`console` block runs with `bash -euo pipefail`, its `curl` failing on an HTTP error
(`--fail-with-body`); a block written as a transcript (`$ command` lines, each followed by its output) runs each
command as it is and compares the output with the one shown. A `python` block runs with this environment's Python.
Both run in one working folder that holds the files the snippets name (cat.jpg, dog.png, photos/, ... made from
scikit-image's photographs) and a model repository `models/` with tiny random-weight ViTs named as the snippets name
them (vit_b_16, vit_b_32; VIT_SNIPPETS_FULL_SIZE=1 serves the real architectures instead), served with the defaults
by one server process as `make run` starts it, and by a second one with API keys and model control for the pages
that need a key (`$KEY` holds it). `localhost:8000` in a snippet is rewritten to the server's port, and `localhost:8001`
to its gRPC port.

A block that cannot run here says so right before its fence, with the reason:
`<!-- snippet: not run (needs a GPU) -->`; `<!-- snippet: expect failure -->` makes a block pass only when it fails.
`toml` and `json` blocks are data: a model.toml must be a valid one, and a JSON block must parse once its `, ...`
elisions are dropped. A JSON answer shown right under a shell block must be shaped like the answer the block gets
(keys and types, not values: exactly, or where it elides, as far as it goes).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from app.config.model_config import ModelConfig
from tests.support.photos import NAMES, jpeg, photo

if TYPE_CHECKING:
    from tests.support.processes import ServerProcess

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
# Pages whose snippets need an API key, run against the server that has one and model control.
KEYED_PAGES = {"docs/guides/security.md", "docs/guides/model-control.md"}

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<language>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*snippet:(?P<body>.*?)-->\s*$")
NOT_RUN = re.compile(r"^not run \((?P<reason>[^()]*\S[^()]*)\)$")
ELISION = re.compile(r",\s*\.\.\.")  # `[1, 2, ...]`: a JSON block's "and so on"
LOCAL_SERVER = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")
LOCAL_GRPC = re.compile(r"\b(?:localhost|127\.0\.0\.1):8001\b")
# VIT_SNIPPETS_FULL_SIZE=1: the repository's own vit_b_16 and vit_b_32 with random weights instead of tiny ViTs, to
# see that the examples work as written with a full-size model and the defaults on this machine (minutes on a CPU).
FULL_SIZE = os.environ.get("VIT_SNIPPETS_FULL_SIZE") == "1"
PHOTOS = 49  # JPEGs in photos/, and one PNG: a folder of 50, as a user might have
# Every curl of a block fails on an HTTP error and shows the server's answer; no progress meter in the report.
CURL_FAILS = 'curl() { command curl --no-progress-meter --fail-with-body "$@"; }\n'

Runner = Callable[..., subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    end: int  # of the closing fence
    language: str
    code: str
    marker: str | None  # the text of a `<!-- snippet: ... -->` right before the fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def not_run_reason(self) -> str | None:
        match = NOT_RUN.match(self.marker or "")
        return match["reason"].strip() if match else None


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, each with the snippet marker on the line before its fence (blank
    lines between allowed)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            line = lines[end]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            end += 1
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = MARKER.match(lines[before]) if before >= 0 else None
        code = "\n".join(body) + "\n"
        language = opening["language"].lower()
        found.append(Block(page, index + 1, end + 1, language, code, marker["body"].strip() if marker else None))
        index = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
RUNNABLE = [block for block in ALL_BLOCKS if block.language in SHELL | PYTHON]
# Those marked "not run (<reason>)" are not parametrized (no skips): the marker test checks each has its reason.
RUN_HERE = [block for block in RUNNABLE if block.not_run_reason is None]


def json_data(block: Block) -> tuple[object, bool]:
    """A JSON block's value, with its `, ...` elisions dropped, and whether it had any."""
    return json.loads(ELISION.sub("", block.code)), ELISION.search(block.code) is not None


def shown_answer(block: Block) -> tuple[object, bool] | None:
    """The JSON answer a page shows right under a shell block (the next fence follows its closing one), and whether
    it elides."""
    for after in ALL_BLOCKS:
        if after.page == block.page and after.line == block.end + 1 and after.language == "json":
            return json_data(after)
    return None


def fits(shown: object, got: object, *, elided: bool) -> bool:
    """`got` is shaped like `shown` (keys, the first element of lists, types; not values): exactly, or where `shown`
    elides, with what it leaves out."""
    if isinstance(shown, dict):
        if not isinstance(got, dict) or not (set(shown) <= set(got) if elided else set(shown) == set(got)):
            return False
        return all(fits(item, got[key], elided=elided) for key, item in shown.items())
    if isinstance(shown, list):
        return isinstance(got, list) and (not shown or not got or fits(shown[0], got[0], elided=elided))
    return kind(shown) == kind(got)


def kind(value: object) -> str:
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def test_the_pages_have_snippets() -> None:
    assert len(RUNNABLE) >= 20, [block.where for block in RUNNABLE]


def test_every_marker_is_explicit_and_placed_before_a_snippet() -> None:
    """A marker says why a block is not run (a marker without a reason fails), and stands right before a fence."""
    problems = []
    for block in ALL_BLOCKS:
        if block.marker is None:
            continue
        if block.language not in SHELL | PYTHON:
            problems.append(f"{block.where}: a marker on a {block.language or 'plain'} block, which never runs")
        elif block.marker != "expect failure" and block.not_run_reason is None:
            problems.append(f"{block.where}: {block.marker!r} is neither 'not run (<reason>)' nor 'expect failure'")
    for page in PAGES:
        marked = {block.line for block in blocks(page) if block.marker is not None}
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            if "snippet:" in line and MARKER.match(line) is None and line.lstrip().startswith("<!--"):
                problems.append(f"{page.relative_to(REPO)}:{number}: a malformed snippet marker")
            if MARKER.match(line) and not any(number < fence <= number + 2 for fence in marked):
                problems.append(f"{page.relative_to(REPO)}:{number}: a snippet marker with no fence right after it")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "toml"], ids=lambda b: b.where)
def test_a_model_toml_in_the_docs_is_a_valid_one(block: Block) -> None:
    raw = tomllib.loads(block.code)
    ModelConfig(name="example", folder=Path("models/example"), **raw)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "json"], ids=lambda b: b.where)
def test_a_json_block_parses(block: Block) -> None:
    json_data(block)


@dataclass
class Servers:
    workdir: Path
    plain: str  # URL of the server `make run` starts
    keyed: str  # URL of the server with API keys and model control, as the security pages start it
    key: str
    plain_grpc: str  # host:port of each one's gRPC port
    keyed_grpc: str


def write_working_folder(workdir: Path) -> None:
    """The files the snippets name, and the model repository `models/` the servers serve from."""
    (workdir / "cat.jpg").write_bytes(jpeg(photo("chelsea")))
    Image.fromarray(photo("astronaut")).save(workdir / "dog.png")
    (workdir / "more.jpg").write_bytes(jpeg(photo("coffee")))
    (workdir / "a.jpg").write_bytes(jpeg(photo("rocket")))
    (workdir / "b.jpg").write_bytes(jpeg(photo("camera")))
    photos = workdir / "photos"  # 50 photographs: each of six, whole and in eight-tenths crops from its corners
    photos.mkdir()
    for number in range(PHOTOS):
        name = NAMES[number % len(NAMES)]
        array = photo(name)
        height, width = array.shape[:2]
        corner = number // len(NAMES) % 4
        top, left = (corner // 2) * height // 5, (corner % 2) * width // 5
        crop = array if number < len(NAMES) else array[top : top + height * 4 // 5, left : left + width * 4 // 5]
        (photos / f"{number:02d}-{name}.jpg").write_bytes(jpeg(crop))
    Image.fromarray(photo("immunohistochemistry")).save(photos / "immunohistochemistry.png")
    from tests.support.fakes import tiny_vit, write_model_folder  # torch: only where the servers start

    if FULL_SIZE:
        for name in ("vit_b_16", "vit_b_32"):
            folder = workdir / "models" / name
            folder.mkdir(parents=True)
            shipped = (REPO / "models" / name / "model.toml").read_text()
            (folder / "model.toml").write_text(re.sub(r'(?m)^weights = ".*"', 'weights = "random"', shipped))
        return
    for name, seed in (("vit_b_16", 0), ("vit_b_32", 1)):
        write_model_folder(workdir / "models", name, tiny_vit(image_size=64, seed=seed))


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    # Removed at the end, not kept like pytest's tmp_path: the fine-tuning example saves a full ViT-B (330 MB).
    with tempfile.TemporaryDirectory(prefix="snippets-") as folder:
        yield from serving(Path(folder))


def serving(workdir: Path) -> Iterator[Servers]:
    from tests.support.processes import free_port, start, stop, wait_ready  # torch: only where the servers start

    write_working_folder(workdir)
    key = secrets.token_hex(24)
    repository = ["--model-repository", str(workdir / "models")]
    plain_port, keyed_port = free_port(), free_port()
    plain_grpc, keyed_grpc = free_port(), free_port()
    processes: list[ServerProcess] = []
    try:
        # Both start at once: their warm-ups overlap. Every setting but the ports and the repository is the default,
        # as `make run` has them (the default model, vit_b_16).
        processes.append(start([*repository, "--port", str(plain_port), "--grpc-port", str(plain_grpc)], cwd=workdir))
        keyed_args = ["--port", str(keyed_port), "--grpc-port", str(keyed_grpc), "--api-keys", key, "--model-control"]
        processes.append(start([*repository, *keyed_args], cwd=workdir))
        plain, keyed = f"http://127.0.0.1:{plain_port}", f"http://127.0.0.1:{keyed_port}"
        wait_ready(processes[0], plain, timeout_s=600 if FULL_SIZE else 120)
        wait_ready(processes[1], keyed, timeout_s=600 if FULL_SIZE else 120)
        yield Servers(workdir, plain, keyed, key, f"127.0.0.1:{plain_grpc}", f"127.0.0.1:{keyed_grpc}")
    finally:
        for process in processes:
            if process.process.poll() is None:
                stop(process)
            else:
                process.wait(timeout_s=10)  # it ended by itself (the failure says why): close its log


def run_block(block: Block, servers: Servers) -> str:
    """Run `block` as the docs show it; a failure message, or "" when it did what it shows."""
    keyed = str(block.page.relative_to(REPO)) in KEYED_PAGES
    url = servers.keyed if keyed else servers.plain
    code = LOCAL_SERVER.sub(url.removeprefix("http://"), block.code)
    code = LOCAL_GRPC.sub(servers.keyed_grpc if keyed else servers.plain_grpc, code)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIT_CLIENT_URL": url,
    }
    if keyed:
        env["KEY"] = servers.key

    def run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # A bound for one snippet on a busy 2-core machine; the slowest (the engine as a library) loads and warms a
        # model of its own: seconds with the tiny one, a minute at most with ViT-B on a CPU.
        return subprocess.run(
            command, cwd=servers.workdir, env=env, input=stdin, capture_output=True, text=True, timeout=300, check=False
        )

    if block.language in PYTHON:
        result = run([sys.executable, "-"], stdin=code)
        return "" if result.returncode == 0 else f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    if code.lstrip().startswith("$ "):
        return run_transcript(code, run)
    result = run(["bash", "-euo", "pipefail", "-c", CURL_FAILS + code])
    failed = result.returncode != 0
    if failed != (block.marker == "expect failure"):
        return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    answer = shown_answer(block)
    if answer is not None and not answered_like(answer, result.stdout):
        return (
            f"the answer is not shaped like the one shown under the block\nshown: {answer[0]}\ngot:   {result.stdout}"
        )
    return ""


def answered_like(answer: tuple[object, bool], stdout: str) -> bool:
    shown, elided = answer
    try:
        return fits(shown, json.loads(stdout), elided=elided)
    except json.JSONDecodeError:
        return False


def run_transcript(code: str, run: Runner) -> str:
    """`$ command` lines, each followed by the output it shows: each command's output must be that output (compared
    as JSON where it is JSON)."""
    steps: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    for command, shown_lines in steps:
        result = run(["bash", "-euo", "pipefail", "-c", command])
        shown, got = "\n".join(shown_lines).strip(), result.stdout.strip()
        if result.returncode != 0 or not same_output(shown, got):
            return f"$ {command}\nexit {result.returncode}\nshown: {shown}\ngot:   {got}\n{result.stderr}"
    return ""


def same_output(shown: str, got: str) -> bool:
    try:
        return bool(json.loads(shown) == json.loads(got))
    except json.JSONDecodeError:
        return shown == got


@pytest.mark.slow
# The first snippet's time includes starting two servers (their warm-ups) on a busy 2-core machine; each snippet is
# bounded by run_block's own timeout.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", RUN_HERE, ids=lambda b: b.where)
def test_snippet_runs(block: Block, request: pytest.FixtureRequest) -> None:
    failure = run_block(block, request.getfixturevalue("servers"))
    assert not failure, f"{block.where}: the snippet failed\n{block.code}\n{failure}"
