"""`vit-serve predict`: its options and variables, its start-up errors, the sizes it fits to the server, and a server
that goes away, against a scripted HTTP server on a real socket; then a real server process with a folder of
generated and real images, bad files among them."""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

from app.serve import cli as server_cli
from tests.support.photos import jpeg, photo
from tests.support.processes import free_port, tiny_server_process
from vit_serve_client import cli
from vit_serve_client import predict as predict_module
from vit_serve_client.predict import Summary, find_images
from vit_serve_client.sizing import fit

MODEL = {"name": "m", "batching": {"max_batch_size": 8, "max_queue_delay_ms": 5.0, "max_queue_size": 256}}


@dataclass
class Stub:
    """A scripted vit-serve: `/v1/models` describes `model` (not ready the first `warming` times); each classify
    request answers one prediction per image (its images counted in `requests`), until `refuse_from`: that request's
    answer is sent only after the port is closed, so that every later connection is refused."""

    url: str = ""
    model: dict[str, Any] = field(default_factory=lambda: dict(MODEL))
    refuse_from: int | None = None
    warming: int = 0  # descriptions that say "not ready" first
    requests: list[int] = field(default_factory=list)  # images per classify request, in order
    queries: list[dict[str, list[str]]] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def stub_server(stub: Stub) -> Iterator[Stub]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            with lock:
                ready = stub.warming <= 0
                stub.warming -= 1
            self.answer({"default": stub.model["name"], "models": [{**stub.model, "ready": ready}]})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            images = body.count(b'name="image"')
            with lock:
                stub.requests.append(images)
                stub.queries.append(parse_qs(urlparse(self.path).query))
                last = stub.refuse_from is not None and len(stub.requests) >= stub.refuse_from
            if last:
                threading.Thread(target=close).start()
                assert stub.closed.wait(timeout=10)
            score = {"index": 1, "label": "one", "score": 0.5}
            self.answer({"model": stub.model["name"], "predictions": [{"top_k": [score]}] * images})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True

    def close() -> None:
        server.shutdown()
        server.server_close()
        stub.closed.set()

    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield stub
    finally:
        if not stub.closed.is_set():
            close()
        thread.join(timeout=10)


def pngs(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:03}.png")
    return folder


def run(*args: str, environ: dict[str, str] | None = None) -> int:
    return cli.predict(["--no-progress", *args], environ=environ or {})


def test_without_a_measured_speed_the_sizes_are_a_cpus_and_a_given_size_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = pngs(tmp_path / "photos", 7)
    with stub_server(Stub()) as stub:
        assert run(str(folder), "--url", stub.url) == 0
        assert sorted(stub.requests) == [1, 2, 2, 2]  # 2 a request: 8 images in flight on a server taken for a CPU
        assert run(str(folder), "--url", stub.url, "--batch", "5") == 0
        assert sorted(stub.requests[4:]) == [2, 5]
    err = capsys.readouterr().err
    assert "7 images to m at http://127.0.0.1:" in err
    assert "2 a request, 4 requests at once (the server advertises no speed)" in err
    assert "5 a request, 2 requests at once (the server advertises no speed)" in err


def test_the_sizes_fit_the_speed_the_server_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = pngs(tmp_path / "photos", 23)
    stub = Stub(model={**MODEL, "measured": {"batch_size": 8, "images_per_s": 10.0, "latency_ms_batch1": 30.0}})
    with stub_server(stub):
        assert run(str(folder), "--url", stub.url) == 0
    assert sorted(stub.requests) == [3, 5, 5, 5, 5]  # 20 images in flight: 2 s of the server's work
    assert "5 a request, 4 requests at once (fitted to the server's measured 10 images/s)" in capsys.readouterr().err


def test_the_fit_stays_within_half_the_servers_queue_and_ignores_what_is_not_a_speed() -> None:
    fast = {"measured": {"images_per_s": 1500.0}, "batching": {"max_queue_size": 256}}
    assert (fit(fast).batch, fit(fast).concurrency) == (16, 8)  # 128 in flight
    small_queue = {"measured": {"images_per_s": 1500.0}, "batching": {"max_queue_size": 8}}
    assert fit(small_queue).batch * fit(small_queue).concurrency <= 4
    slow = {"measured": {"images_per_s": 3.0}}
    assert (fit(slow).batch, fit(slow).concurrency) == (1, 6)
    for nonsense in (None, "fast", True, -1, float("nan"), float("inf"), {"images_per_s": 0}):
        assert fit({"measured": nonsense}) == fit({}), nonsense
    assert fit({}, batch=16, concurrency=3).basis == "as given"


def test_options_are_also_variables_and_a_flag_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = pngs(tmp_path / "photos", 2)
    with stub_server(Stub()) as stub:
        environ = {"VIT_CLIENT_URL": stub.url, "VIT_CLIENT_TOP_K": "2", "VIT_CLIENT_BATCH": "2"}
        assert run(str(folder), environ=environ) == 0
        assert run(str(folder), "--top-k", "3", environ=environ) == 0
    assert [q["top_k"] for q in stub.queries] == [["2"], ["3"]] and stub.requests == [2, 2]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(json.loads(line)["error"] is None for line in lines)


def test_help_lists_every_option_with_its_variable_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        server_cli.main(["predict", "--help"])  # the server's command hands predict to the client's
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = [a for a in cli.predict_parser({})._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 12
    for action in options:
        assert f"[VIT_CLIENT_{action.dest.upper()}]" in text, action.dest
    assert "Default: http://localhost:8000." in text and "Default: 60." in text and "Default: true." in text


def test_a_bad_variable_is_a_start_up_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        run("photos", environ={"VIT_CLIENT_CONCURRENCY": "0", "VIT_CLIENT_PROGRESS": "maybe"})
    assert caught.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "VIT_CLIENT_CONCURRENCY='0' is not a valid --concurrency value" in error
    assert "VIT_CLIENT_PROGRESS='maybe' is not one of" in error


def test_a_missing_path_is_one_start_up_error_and_leaves_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = pngs(tmp_path / "photos", 2)
    output = tmp_path / "out.jsonl"
    with stub_server(Stub()) as stub:
        status = run(str(folder), str(tmp_path / "nowhere.jpg"), "--url", stub.url, "--output", str(output))
    assert status == 2 and stub.requests == []
    assert capsys.readouterr().err == f"vit-serve predict: no such file or folder: {tmp_path / 'nowhere.jpg'}\n"
    assert not output.exists()  # a run started again needs no --resume


def test_a_folder_without_images_is_a_start_up_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    assert run(str(tmp_path), "--url", "http://127.0.0.1:9") == 2
    assert capsys.readouterr().err.startswith("vit-serve predict: no image files (.bmp .gif .jpe .jpeg .jpg .png")


def test_an_unreachable_server_is_one_start_up_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = pngs(tmp_path / "photos", 5)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert run(str(folder), "--url", url, "--attempts", "2") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"vit-serve predict: cannot reach {url}: ConnectError")


def test_a_model_the_server_does_not_serve_is_one_start_up_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = pngs(tmp_path / "photos", 1)
    with stub_server(Stub()) as stub:
        assert run(str(folder), "--url", stub.url, "--model", "other") == 2
    assert capsys.readouterr().err == f"vit-serve predict: {stub.url} serves no model 'other' (it serves m)\n"
    assert stub.requests == []


def test_a_server_that_is_warming_up_is_waited_for_within_a_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predict_module, "READY_POLL_S", 0.01)
    folder = pngs(tmp_path / "photos", 3)
    with stub_server(Stub(warming=2)) as stub:
        assert run(str(folder), "--url", stub.url) == 0
    assert sorted(stub.requests) == [1, 2]  # two requests sent at once: either may arrive first
    assert f"vit-serve predict: waiting up to 300 s for m at {stub.url} to be ready" in capsys.readouterr().err
    with stub_server(Stub(warming=1000)) as stub:
        assert run(str(folder), "--url", stub.url, "--wait-s", "0") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vit-serve predict: {stub.url}: model 'm' was not ready within 0 s"
    )
    assert stub.requests == []


def test_a_server_that_goes_away_ends_the_run_with_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = pngs(tmp_path / "photos", 10)
    output = tmp_path / "out.jsonl"
    args = [str(folder), "--output", str(output), "--batch", "1", "--concurrency", "1", "--attempts", "2"]
    with stub_server(Stub(refuse_from=3)) as stub:
        assert run(*args, "--url", stub.url) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith(f"vit-serve predict: stopped: cannot reach {stub.url}: ConnectError")
    assert err[-1].startswith("10 images: 3 classified, 1 failed, 0 skipped (done before), 6 not sent;")
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["error"] is None for line in lines] == [True, True, True, False]
    with stub_server(Stub()) as again:
        assert run(*args, "--url", again.url, "--resume") == 0
    assert again.requests == [1] * 7  # the failed one and the six never sent
    assert capsys.readouterr().err.splitlines()[-1].startswith("10 images: 7 classified, 0 failed, 3 skipped")


def test_the_summary_never_prints_nan() -> None:
    nothing = Summary(images=3, failed=3).text()
    assert "nan" not in nothing and "no request answered" in nothing
    assert "p50 1000 ms, p99 2000 ms" in Summary(images=2, succeeded=2, seconds=2, latencies_s=[1.0, 2.0]).text()


def test_the_client_command_alone_says_serve_is_the_servers(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "download"):
        with pytest.raises(SystemExit) as caught:
            cli.main([command, "--port", "8000"])
        assert caught.value.code == 2
        assert "is the server's: pip install vit-serve" in capsys.readouterr().err


def image_folder(root: Path) -> dict[str, str]:
    """A folder of images to classify, bad ones among them; what each should come to ('ok' or the error's start)."""
    (root / "photos" / "nested").mkdir(parents=True)
    expected = {}
    for name in ("chelsea", "coffee", "camera"):
        path = root / "photos" / f"{name}.jpg"
        path.write_bytes(jpeg(photo(name)))
        expected[str(path)] = "ok"
    for i in range(7):
        path = root / "photos" / "nested" / f"generated{i}.png"
        Image.new("RGB", (40 + i, 30), ((40 * i) % 256, 90, 200)).save(path)
        expected[str(path)] = "ok"
    broken = root / "photos" / "broken.jpg"
    broken.write_bytes(jpeg(photo("chelsea"))[:3000])
    expected[str(broken)] = "400 invalid_image"
    text = root / "photos" / "notes.png"
    text.write_text("not a picture")
    expected[str(text)] = "415 unsupported_image_format"
    dangling = root / "photos" / "gone.jpg"
    dangling.symlink_to(root / "nowhere.jpg")
    expected[str(dangling)] = "unreadable"
    (root / "photos" / "README.txt").write_text("skipped: not an image suffix")
    return expected


def predict_cmd(url: str, *args: str, progress: bool = False) -> subprocess.CompletedProcess[str]:
    flags = [] if progress else ["--no-progress"]
    command = [str(Path(sys.executable).parent / "vit-serve"), "predict", "--url", url, *flags, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_predict_a_folder_writes_a_line_per_image_and_fails_only_the_bad_ones(tmp_path: Path) -> None:
    expected = image_folder(tmp_path)
    assert len(find_images([tmp_path / "photos"])) == len(expected)
    output = tmp_path / "out.jsonl"
    with tiny_server_process(tmp_path) as url:
        result = predict_cmd(url, str(tmp_path / "photos"), "--output", str(output), "--batch", "4", "--top-k", "2")
        assert result.returncode == 1, result.stderr  # some images failed
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        assert sorted(line["path"] for line in lines) == sorted(expected)
        for line in lines:
            want = expected[line["path"]]
            if want == "ok":
                assert line["error"] is None and len(line["top_k"]) == 2, line
            else:
                assert line["error"].startswith(want) and line["top_k"] is None, line
        assert "13 images: 10 classified, 3 failed, 0 skipped" in result.stderr

        again = predict_cmd(url, str(tmp_path / "photos"), "--output", str(output))
        assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a run's output
        resumed = predict_cmd(url, str(tmp_path / "photos"), "--output", str(output), "--resume")
        assert "13 images: 0 classified, 3 failed, 10 skipped" in resumed.stderr  # only the failed ones again
        assert len(output.read_text().splitlines()) == 16

        table = tmp_path / "out.csv"
        files = [str(tmp_path / "photos" / "chelsea.jpg"), str(tmp_path / "photos" / "notes.png")]
        assert predict_cmd(url, *files, "--output", str(table)).returncode == 1
        with table.open(newline="") as stream:
            rows = {row["path"]: row for row in csv.DictReader(stream)}  # lines come in the order images finish
        assert table.read_text().startswith("path,label,score,top_k,error\n") and len(rows) == 2
        good, bad = rows[files[0]], rows[files[1]]
        assert good["label"].startswith("label ") and float(good["score"]) > 0 and not good["error"]
        assert len(json.loads(good["top_k"])) == 5
        assert bad["error"].startswith("415 unsupported_image_format") and not bad["label"]


@pytest.mark.slow
def test_predict_rides_out_a_full_queue_with_retries(tmp_path: Path) -> None:
    """A server that can hold 4 images, 6 clients sending 4 at once: refused with 503, sent again, all answered."""
    for i in range(48):
        Image.new("RGB", (64, 64), (i * 5, 100, 50)).save(tmp_path / f"{i}.png")
    with tiny_server_process(tmp_path, "--max-queue-size", "4", "--max-batch-size", "4") as url:
        result = predict_cmd(
            url, str(tmp_path), "--batch", "4", "--concurrency", "6", "--attempts", "50", progress=True
        )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 48
    assert "48/48" in result.stderr and "img/s" in result.stderr  # the progress bar, with its rate
    summary = result.stderr.strip().splitlines()[-1]
    assert "48 images: 48 classified, 0 failed" in summary
    sent_again = int(summary.split("; ")[-1].split()[0])
    assert sent_again > 0  # the 503s happened, and were retried


@pytest.mark.slow
def test_predict_with_its_defaults_fits_the_speed_a_real_server_measured(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "astronaut", "coffee", "rocket", "camera"):
        (folder / f"{name}.jpg").write_bytes(jpeg(photo(name)))
    with tiny_server_process(tmp_path) as url:
        result = predict_cmd(url, str(folder))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5
    plan, summary = result.stderr.strip().splitlines()
    assert (
        plan.startswith(f"vit-serve predict: 5 images to tiny at {url}: ") and "fitted to the server's measured" in plan
    )
    assert summary.startswith("5 images: 5 classified, 0 failed")
