"""The demo page at `/`: its files only, a strict CSP, open without a key; and, in Debian's chromium driven by
Playwright, a real photograph picked or dropped on it shows the top-5 bars, the latency and the attention overlay."""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from app.config.settings import Settings
from tests.support.fakes import fake_engine
from tests.support.inprocess import ClientFactory
from tests.support.processes import chelsea_jpeg, tiny_server_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, installed by `make test`
KEY = "demo-key-0123456789"
TINY_LABELS = {f"label {i}" for i in range(10)}  # tests.support.processes.write_tiny_model's
WAIT_MS = 30_000
CSP_WATCH = """document.addEventListener("securitypolicyviolation", (event) => {
  (window.cspViolations = window.cspViolations || []).push(event.violatedDirective);
});"""
OVERLAY_SETTLED = """() => {
  const overlay = document.getElementById("overlay");
  return (overlay.complete && overlay.naturalWidth > 0)
    || document.getElementById("overlay-message").textContent.startsWith("No explanation");
}"""


# --- the files, in-process ---


async def test_the_page_and_its_files_are_served_with_a_strict_policy(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data: blob:" in policy
    assert "unsafe" not in policy and "frame-ancestors 'none'" in policy
    assert page.headers["cache-control"] == "no-cache"
    assert 'src="static/demo.js"' in page.text and 'href="static/demo.css"' in page.text  # relative: prefix-proof
    assert "http" not in page.text  # nothing from elsewhere
    revalidated = await client.get("/", headers={"If-None-Match": page.headers["etag"]})
    assert revalidated.status_code == 304 and not revalidated.content

    script = await client.get("/static/demo.js")
    assert script.status_code == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["x-content-type-options"] == "nosniff" and "fetch(" in script.text
    style = await client.get("/static/demo.css")
    assert style.status_code == 200 and style.headers["content-type"] == "text/css; charset=utf-8"
    for icon in ("/favicon.ico", "/static/favicon.svg"):
        answer = await client.get(icon)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/svg+xml"
        assert answer.content.startswith(b"<svg")

    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2Fsettings.py",  # decoded by the server to /static/../settings.py
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/static/..%2Fapi%2Fdemo.py",
        "/static/index.html",  # shipped, but served only as /
        "/static/demo.py",
        "/static/.",
        "/static/",
        "/static",
        "/index.html",
    ],
)
async def test_nothing_else_is_served(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "code": "not_found"}


async def test_with_api_keys_the_page_needs_no_key_and_the_api_still_does(serve: ClientFactory) -> None:
    async with serve(fake_engine(), Settings(drain_timeout_s=5, api_keys=KEY)) as client:
        for path in ("/", "/static/demo.js", "/static/demo.css", "/favicon.ico", *DOCS_FILES):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/v1/models")).status_code == 401
        # Open under /static/ means nothing there but the files: the router never resolves dot segments.
        assert (await client.get("/static/..%2Fv1%2Fmodels")).status_code == 404
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200


DOCS_FILES = ("/docs", "/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css")


async def test_the_api_docs_load_their_scripts_and_styles_from_the_service_itself(client: httpx.AsyncClient) -> None:
    for path, script in (("/docs", "swagger-ui-bundle.js"),):
        page = await client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f"/static/docs/{script}?v=" in page.text
        assert "https://" not in page.text and "//cdn" not in page.text  # no CDN, no fonts, no remote icon
        urls = re.findall(r"(?:src=|href=|url=|url: )['\"]([^'\"]+)['\"]", page.text)
        assert urls and all(url.startswith("/") for url in urls), urls
        asset = await client.get(f"/static/docs/{script}")
        assert asset.status_code == 200 and asset.headers["content-type"] == "text/javascript; charset=utf-8"
    style = await client.get("/static/docs/swagger-ui.css")
    assert style.status_code == 200 and style.headers["content-type"] == "text/css; charset=utf-8"
    assert (await client.get("/static/docs/oauth2-redirect.html")).status_code == 404  # the named files only
    assert (await client.get("/redoc")).status_code == 404  # ReDoc 2 cannot read an OpenAPI 3.1 schema's $defs


# --- the page, in a real browser against a real server process ---


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # As root (CI), chromium refuses to start with its sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server_process(tmp_path_factory.mktemp("open")) as url:
        yield url


@pytest.fixture(scope="module")
def random_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server_process(tmp_path_factory.mktemp("random"), "--weights", "random") as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server_process(tmp_path_factory.mktemp("keyed"), "--api-keys", KEY) as url:
        yield url


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(CSP_WATCH)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    violations = page.evaluate("window.cspViolations || []")
    context.close()
    assert not errors, f"the page's script raised: {errors}"
    assert not violations, f"the page broke its own Content-Security-Policy: {violations}"


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    path.write_bytes(chelsea_jpeg())
    return path


def expected_top5(url: str, photo: Path, key: str | None = None) -> list[tuple[str, float]]:
    headers = {"Content-Type": "image/jpeg"} | ({"Authorization": f"Bearer {key}"} if key else {})
    answer = httpx.post(
        f"{url}/v1/models/tiny/classify?top_k=5&logits=false", content=photo.read_bytes(), headers=headers
    )
    return [(c["label"], c["score"] * 100) for c in answer.json()["predictions"][0]["top_k"]]


def assert_bars_show(page: Page, expected: list[tuple[str, float]]) -> None:
    bars = page.locator(".bar")
    expect(bars).to_have_count(5, timeout=WAIT_MS)
    labels = bars.locator(".bar-label").all_inner_texts()
    scores = [float(text.removesuffix("%")) for text in bars.locator(".bar-score").all_inner_texts()]
    assert set(labels) <= TINY_LABELS
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores) and sum(scores) <= 100.25
    assert labels == [label for label, _ in expected]  # exactly the server's answer, in its order
    assert scores == pytest.approx([score for _, score in expected], abs=0.051)
    widths = page.eval_on_selector_all(
        ".bar-fill", "fills => fills.map((f) => f.getBoundingClientRect().width / f.parentElement.clientWidth)"
    )
    assert widths == pytest.approx([s / 100 for s in scores], abs=0.01)
    expect(page.locator("#latency")).to_have_text(re.compile(r"^tiny: round trip \d+ ms · server \d+\.\d ms$"))
    expect(page.locator("#error")).to_be_empty()


def screenshot(page: Page, path: Path) -> None:
    page.wait_for_function(OVERLAY_SETTLED, timeout=WAIT_MS)  # the overlay or the reason it is missing
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


def assert_overlay_shown(page: Page) -> None:
    width = page.eval_on_selector("#overlay", "overlay => overlay.hidden ? 0 : overlay.naturalWidth")
    assert width > 0, page.inner_text("#overlay-message")


@pytest.mark.slow
def test_a_picked_photo_shows_its_top_5_the_latency_and_the_attention(
    page: Page, open_server: str, photo: Path, tmp_path: Path
) -> None:
    page.goto(open_server)
    expect(page.locator("#model")).to_be_enabled()
    expect(page.locator("#model")).to_have_value("tiny")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#notice")).to_be_hidden()  # trained weights: nothing to warn of
    page.set_input_files("#file", photo)
    assert_bars_show(page, expected_top5(open_server, photo))
    expect(page.locator("#preview")).to_have_attribute("src", re.compile("^blob:"))
    screenshot(page, tmp_path / "demo.png")
    assert_overlay_shown(page)


@pytest.mark.slow
def test_with_api_keys_the_page_asks_for_the_key_and_asks_again_when_it_is_wrong(
    page: Page, keyed_server: str, photo: Path, tmp_path: Path
) -> None:
    page.goto(keyed_server)
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text("this service needs an API key")
    page.fill("#api-key", "a-wrong-guess")
    page.click("#api-key-submit")
    expect(page.locator("#key-message")).to_have_text("the API key is not valid")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#model")).to_have_value("tiny")

    drop_file(page, "#drop", photo, "image/jpeg")  # this time dragged and dropped
    assert_bars_show(page, expected_top5(keyed_server, photo, KEY))
    expect(page.locator("#key-form")).to_be_hidden()  # the key was sent with every call
    assert page.evaluate("sessionStorage.getItem('vit-serve.api-key')") == KEY
    screenshot(page, tmp_path / "demo-with-key.png")
    assert_overlay_shown(page)


@pytest.mark.slow
def test_a_failed_explanation_leaves_the_bars_and_a_bad_file_shows_the_servers_error(
    page: Page, open_server: str, photo: Path
) -> None:
    failure = '{"error": "the explainer is out to lunch", "code": "internal_error"}'
    page.route("**/explain?*", lambda route: route.fulfill(status=500, content_type="application/json", body=failure))
    page.goto(open_server)
    page.set_input_files("#file", photo)
    assert_bars_show(page, expected_top5(open_server, photo))
    expect(page.locator("#overlay-message")).to_have_text("No explanation: the explainer is out to lunch")
    expect(page.locator("#overlay")).to_be_hidden()

    not_an_image = b"not an image"
    refusal = httpx.post(
        f"{open_server}/v1/models/tiny/classify", content=not_an_image, headers={"Content-Type": "text/plain"}
    )
    assert refusal.status_code == 415
    page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": not_an_image})
    # One message, for a person (no advice on request headers); no preview, empty heading or explanation beside it.
    expect(page.locator("#error")).to_have_text(
        "notes.txt is not an image the model can read. Choose a photo: JPEG, PNG, WebP…"
    )
    expect(page.locator("#results")).to_be_hidden()
    expect(page.locator(".bar")).to_have_count(0)
    expect(page.get_by_text("not an image the model can read")).to_have_count(1)


def drop_file(page: Page, selector: str, path: Path, mime_type: str) -> None:
    """What a person dragging `path` from their file manager onto `selector` does: a drop event carrying the file."""
    transfer = page.evaluate_handle(
        """([name, type, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type }));
            return transfer;
        }""",
        [path.name, mime_type, base64.b64encode(path.read_bytes()).decode()],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


@pytest.mark.slow
def test_a_model_serving_random_weights_says_so(page: Page, random_server: str, photo: Path) -> None:
    page.goto(random_server)
    expect(page.locator("#notice")).to_be_visible()
    expect(page.locator("#notice")).to_have_text(re.compile(r"^tiny serves random weights: its classes .* meaningless"))
    page.set_input_files("#file", photo)
    expect(page.locator(".bar")).to_have_count(5)
    expect(page.locator("#notice")).to_be_visible()  # beside the answer too


@pytest.mark.slow
def test_the_api_docs_render_with_no_request_leaving_the_machine(page: Page, open_server: str) -> None:
    """Offline: every request /docs makes goes to the service itself; any other is refused here, and recorded."""
    elsewhere: list[str] = []

    def only_the_service(route: Route) -> None:
        url = route.request.url
        if url.startswith(open_server) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    page.route("**/*", only_the_service)
    page.goto(f"{open_server}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("vit-serve")  # the spec read and rendered
    assert page.evaluate("typeof ui === 'object' && typeof ui.specSelectors === 'object'")  # the Swagger UI object
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible()  # the operations, from /openapi.json
    assert not elsewhere, elsewhere
