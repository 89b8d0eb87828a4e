"""Hostile and odd input over HTTP: every case gets a clear JSON 4xx (or a correct 200), and the service goes on.

The decoder's own cases (modes, truncation, corrupt data, not-images) are in test_decode.py; this file adds the
whole request path: bombs in every accepted format, metadata, multipart and JSON abuse, lying headers, uploads that
must never reach the disk, and a real process that stays flat in memory after the whole corpus, many times over.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import sys
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from app.config.settings import Settings
from tests.conftest import ClientFactory
from tests.fakes import fake_engine, image_bytes
from tests.processes import chelsea_jpeg, tiny_server

RED = image_bytes((255, 0, 0))


def encode(fmt: str, size: tuple[int, int] = (8, 8), mode: str = "RGB", **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 20, 30) if mode == "RGB" else 7).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_png_chunk(png: bytes, chunk: bytes) -> bytes:
    """The chunk inserted right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + chunk + png[33:]


# -- decompression bombs: a small file that declares a huge picture, in every accepted format ------------------


def jpeg_of_size(width: int, height: int) -> bytes:
    data = bytearray(encode("JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png_of_size(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_of_size(width: int, height: int) -> bytes:
    data = bytearray(encode("GIF"))
    struct.pack_into("<HH", data, 6, width, height)  # logical screen
    descriptor = data.find(b"\x2c", 13)
    struct.pack_into("<HH", data, descriptor + 5, width, height)
    return bytes(data)


def bmp_of_size(width: int, height: int) -> bytes:
    data = bytearray(encode("BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def webp_of_size(width: int, height: int) -> bytes:
    data = bytearray(encode("WEBP", lossless=True))
    header = data.find(b"VP8L") + 9  # after the chunk size and the 0x2f signature byte
    bits = struct.unpack_from("<I", data, header)[0] & ~((1 << 28) - 1)
    struct.pack_into("<I", data, header, bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def tiff_of_size(width: int, height: int) -> bytes:
    data = bytearray(encode("TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        offset = ifd + 2 + 12 * entry
        tag, kind = struct.unpack_from("<HH", data, offset)
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<H" if kind == 3 else "<I", data, offset + 8, width if tag == 256 else height)
    return bytes(data)


BOMBS: dict[str, Callable[[int, int], bytes]] = {
    "jpeg": jpeg_of_size,
    "png": png_of_size,
    "gif": gif_of_size,
    "bmp": bmp_of_size,
    "webp": webp_of_size,
    "tiff": tiff_of_size,
}


@pytest.mark.parametrize("fmt", list(BOMBS))
@pytest.mark.parametrize(
    "size",
    [(8000, 6000), (10000, 10000), (65000, 65000)],
    ids=["over-our-limit", "pils-warning-zone", "over-pils-own-limit"],
)
async def test_a_decompression_bomb_is_413_before_any_pixel_is_allocated(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, fmt: str, size: tuple[int, int]
) -> None:
    if fmt == "webp" and max(size) > 16384:
        size = (16384, 16384)  # WebP's largest
    if fmt in ("gif", "tiff") and max(size) > 65535:
        size = (65535, 65535)
    bomb = BOMBS[fmt](*size)
    assert len(bomb) < 2048
    with pytest.MonkeyPatch.context() as unlimited:  # it really declares that size
        unlimited.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(io.BytesIO(bomb)) as opened:
            assert opened.size == size
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))

    response = await client.post("/v1/classify", content=bomb, headers={"Content-Type": "image/*"})

    assert (response.status_code, response.json()["code"]) == (413, "image_too_large")
    assert not loads  # refused from the header: the decoder never ran
    monkeypatch.undo()
    assert (await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})).status_code == 200


# -- odd but valid images: a 200 each -------------------------------------------------------------------------


def icc_jpeg() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode("JPEG", (64, 48), icc_profile=profile)


def multipage_tiff() -> bytes:
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (80, 10), (0, 0, 200))
    first.save(buffer, format="TIFF", save_all=True, append_images=[second])
    return buffer.getvalue()


def png_with_big_text() -> bytes:
    """4 MB of tEXt metadata around an 8x8 picture."""
    return with_png_chunk(encode("PNG"), png_chunk(b"tEXt", b"Comment\x00" + b"x" * 4_000_000))


def jpeg_with_big_comments() -> bytes:
    """A JPEG carrying 60 COM segments of 64 KB each (almost 4 MB of metadata)."""
    jpeg = encode("JPEG")
    com = b"\xff\xfe" + struct.pack(">H", 65535) + b"c" * 65533
    return jpeg[:2] + com * 60 + jpeg[2:]


ODD_VALID = {
    "cmyk-jpeg": lambda: encode("JPEG", (32, 32), mode="CMYK"),
    "16-bit-png": lambda: encode("PNG", (32, 32), mode="I;16"),
    "palette-png": lambda: encode("PNG", (32, 32), mode="P"),
    "la-png": lambda: encode("PNG", (32, 32), mode="LA"),
    "rgba-png": lambda: encode("PNG", (32, 32), mode="RGBA"),
    "1x1": lambda: encode("PNG", (1, 1)),
    "1x10000": lambda: encode("PNG", (1, 10000)),
    "10000x1": lambda: encode("JPEG", (10000, 1)),
    "icc-profile-jpeg": icc_jpeg,
    "multipage-tiff": multipage_tiff,
    "big-png-text-chunk": png_with_big_text,
    "big-jpeg-comments": jpeg_with_big_comments,
}


@pytest.mark.parametrize("build", list(ODD_VALID.values()), ids=list(ODD_VALID))
async def test_odd_but_valid_images_are_classified(client: httpx.AsyncClient, build: Callable[[], bytes]) -> None:
    response = await client.post("/v1/classify", content=build(), headers={"Content-Type": "image/*"})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


# -- not images, and broken ones: a 4xx each --------------------------------------------------------------------

HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
PNG_ZTXT_BOMB = with_png_chunk(encode("PNG"), png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"x" * 50_000_000)))


def flipped(data: bytes, seed: int) -> bytes:
    """Bits flipped in the middle of the file."""
    out = bytearray(data)
    rng = np.random.default_rng(seed)
    for offset in rng.integers(len(out) // 4, 3 * len(out) // 4, size=32):
        out[offset] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def photo(fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(chelsea_jpeg())).save(buffer, format=fmt, **options)
    return buffer.getvalue()


BROKEN: dict[str, tuple[bytes, set[int]]] = {
    "heic": (HEIC, {415}),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', {415}),
    "pdf": (b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", {415}),
    "html-as-jpeg": (b"<html><body>hi</body></html>", {415}),
    "random-bytes": (np.random.default_rng(7).bytes(10_000), {415}),
    "png-ztxt-bomb": (PNG_ZTXT_BOMB, {200, 400}),  # PIL caps decompressed text; either way never 50 MB
    **{
        f"truncated-{fmt.lower()}": (photo(fmt, **opts)[: len(photo(fmt, **opts)) // 2], {400})
        for fmt, opts in [("JPEG", {}), ("PNG", {}), ("WEBP", {"quality": 80})]
    },
    **{
        f"bit-flipped-{fmt.lower()}-{seed}": (flipped(photo(fmt, **opts), seed), {200, 400})
        for fmt, opts in [("JPEG", {}), ("PNG", {}), ("WEBP", {"quality": 80})]
        for seed in range(3)
    },
}


@pytest.mark.parametrize(("data", "statuses"), list(BROKEN.values()), ids=list(BROKEN))
async def test_broken_input_gets_a_clear_json_4xx_and_the_service_goes_on(
    client: httpx.AsyncClient, data: bytes, statuses: set[int]
) -> None:
    response = await client.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code in statuses, response.text
    if response.status_code != 200:
        body = response.json()
        assert body["code"] in {"invalid_image", "unsupported_image_format"} and body["error"]
    assert (await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})).status_code == 200


# -- multipart and JSON abuse ---------------------------------------------------------------------------------


def multipart(parts: list[bytes], boundary: bytes = b"b0undary") -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--" + boundary + b"\r\n" + part for part in parts) + b"--" + boundary + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


def file_part(data: bytes, name: str = "image") -> bytes:
    return (
        f'Content-Disposition: form-data; name="{name}"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        + data
        + b"\r\n"
    )


def field_part(name: str, value: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


MULTIPART_ABUSE: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "thousands-of-file-parts": (*multipart([file_part(RED)] * 3000), 413, "too_many_images"),
    "thousands-of-fields": (*multipart([file_part(RED)] + [field_part("top_k", "1")] * 3000), 400, "invalid_multipart"),
    "part-without-disposition": (
        *multipart([b"Content-Type: image/png\r\n\r\n" + RED + b"\r\n"]),
        400,
        "invalid_multipart",
    ),
    "giant-part-headers": (
        *multipart([b"X-Junk: " + b"j" * 20_000 + b"\r\n" + file_part(RED)]),
        400,
        "invalid_multipart",
    ),
    "giant-text-field": (*multipart([file_part(RED), field_part("top_k", "1" * 5000)]), 400, "invalid_multipart"),
    "wrong-boundary": (multipart([file_part(RED)], b"other")[0], multipart([], b"mine")[1], 400, "invalid_multipart"),
    "unterminated": (multipart([file_part(RED)])[0][:-12], multipart([])[1], 400, "invalid_multipart"),
    "no-parts": (*multipart([]), 400, "no_image"),
    "empty-file-part": (*multipart([file_part(b"")]), 400, "empty_image"),
}


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"), list(MULTIPART_ABUSE.values()), ids=list(MULTIPART_ABUSE)
)
async def test_multipart_abuse_gets_a_clear_4xx(
    client: httpx.AsyncClient, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    response = await client.post("/v1/classify", content=body, headers=headers)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert (await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})).status_code == 200


async def test_a_1_gb_part_is_cut_off_at_the_body_limit_without_reading_the_rest(serve: ClientFactory) -> None:
    sent = 0

    async def one_gigabyte() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
        for _ in range(1024):
            sent += 1 << 20
            yield b"\0" * (1 << 20)

    async with serve(fake_engine(), Settings(drain_timeout_s=5, max_body_bytes=4 << 20)) as client:
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
        response = await client.post("/v1/classify", content=one_gigabyte(), headers=headers)
        assert (response.status_code, response.json()["code"]) == (413, "body_too_large")
        assert sent <= 6 << 20  # the server stopped reading just past the limit, not at 1 GB
        assert (
            await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
        ).status_code == 200


_WRITES: list[str] | None = None  # while a list, every file opened for writing is recorded in it


def _record_writes(event: str, args: tuple[Any, ...]) -> None:
    if _WRITES is None or event != "open":
        return
    path, mode, flags = args
    if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    ):
        _WRITES.append(str(path))


sys.addaudithook(_record_writes)  # audit hooks cannot be removed: this one records only inside the test below


async def test_uploads_never_touch_the_disk(client: httpx.AsyncClient) -> None:
    """A 2.4 MB multipart upload (Starlette's own form parser would spool anything over 1 MB to a temporary file),
    a raw one and a JSON one: no file is opened for writing while they are read, decoded and classified."""
    global _WRITES
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    upload = buffer.getvalue()
    assert len(upload) > 2_000_000
    _WRITES = []
    try:
        responses = [
            await client.post("/v1/classify", files=[("image", ("noise.png", upload, "image/png"))]),
            await client.post("/v1/classify", content=upload, headers={"Content-Type": "image/png"}),
            await client.post("/v1/classify", json={"images": [base64.b64encode(upload).decode()]}),
        ]
        writes = _WRITES
    finally:
        _WRITES = None
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert writes == []


def test_the_write_detector_sees_a_spooled_upload() -> None:
    """The detector above is not blind: Starlette's spooling, past 1 MB, is caught."""
    global _WRITES
    _WRITES = []
    try:
        with tempfile.SpooledTemporaryFile(max_size=1 << 20) as spooled:
            spooled.write(b"x" * (2 << 20))
        writes = _WRITES
    finally:
        _WRITES = None
    assert writes


async def test_ten_thousand_tiny_images_in_one_json_request_are_413(client: httpx.AsyncClient) -> None:
    tiny = base64.b64encode(encode("PNG", (1, 1))).decode()
    response = await client.post("/v1/classify", json={"images": [tiny] * 10_000})
    assert (response.status_code, response.json()["code"]) == (413, "too_many_images")
    # Counted before any image is decoded: the bad base64 at the end is never reached.
    response = await client.post("/v1/classify", json={"images": [tiny] * 9_999 + ["not base64!"]})
    assert (response.status_code, response.json()["code"]) == (413, "too_many_images")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"colour": "red"}, "invalid_parameter"),
        ({"top_k": "-1"}, "invalid_parameter"),
        ({"logits": "maybe"}, "invalid_parameter"),
    ],
)
async def test_unknown_and_invalid_query_parameters_are_422(
    client: httpx.AsyncClient, params: dict[str, str], code: str
) -> None:
    response = await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"}, params=params)
    assert (response.status_code, response.json()["code"]) == (422, code)


# -- a real process: lying headers, and memory after the whole corpus, many times over --------------------------


def raw_exchange(url: str, request: bytes, *, half_close: bool = False) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def post(path: str, headers: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode() + body


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_a_real_server_survives_lying_headers_and_stays_flat_in_memory_after_the_corpus(tmp_path: Path) -> None:
    jpeg = chelsea_jpeg()
    with tiny_server(tmp_path, "--max-body-bytes", str(8 << 20)) as (url, server):
        # Content-Length shorter than the body: the request is the truncated image (a JSON 400); the rest is junk
        # that the HTTP parser refuses on its own, closing that connection.
        short = raw_exchange(
            url, post("/v1/classify", f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg) // 2}\r\n", jpeg)
        )
        assert short.startswith(b"HTTP/1.1 400") and b'"code":"invalid_image"' in short
        # Content-Length longer than the body, then the client stops sending: no answer, nothing held.
        long = raw_exchange(
            url,
            post("/v1/classify", f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg) * 2}\r\n", jpeg),
            half_close=True,
        )
        assert b"200 OK" not in long
        # Content-Length that is not a number, and one next to chunked encoding (request smuggling): refused.
        for headers in ("Content-Length: lots\r\n", "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n"):
            assert raw_exchange(
                url, post("/v1/classify", "Content-Type: image/jpeg\r\n" + headers, b"0\r\n\r\n")
            ).startswith(b"HTTP/1.1 400")

        corpus: list[tuple[bytes, str]] = [(data, "image/jpeg") for data, _ in BROKEN.values()]
        corpus += [(BOMBS[fmt](9000, 8000), "image/*") for fmt in BOMBS]
        corpus += [(build(), "image/*") for build in ODD_VALID.values()]
        corpus += [(body, headers["Content-Type"]) for body, headers, _, _ in MULTIPART_ABUSE.values()]

        def run_corpus() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                for body, content_type in corpus:
                    response = client.post("/v1/classify", content=body, headers={"Content-Type": content_type})
                    assert response.status_code < 500, response.text
                    response.json()  # always JSON

        run_corpus()
        run_corpus()
        after_warmup = rss_bytes(server.process.pid)
        for _ in range(5):
            run_corpus()
        after = rss_bytes(server.process.pid)
        good = httpx.post(f"{url}/v1/classify", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert good.status_code == 200
    assert after < after_warmup * 1.10 + (8 << 20), (after_warmup, after)
