"""Hostile and odd input over HTTP: every case gets a clear JSON 4xx (or a correct 200), and the service goes on.

The decoder's own cases (modes, truncation, corrupt data, not-images) are in test_decode.py; this file adds the
whole request path: bombs in every accepted format, images whose cost is not their pixels (thousands of scans or
segments or chunks, extreme aspect ratios), decodes that outlive their request (readiness), metadata, multipart and
JSON abuse, lying headers, uploads that must never reach the disk, and a real process that stays flat in memory after
the whole corpus, many times over.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import skimage.data
from PIL import Image, ImageCms, ImageFile
from pydantic import SecretStr

from app.config.settings import BatchingConfig, Settings
from app.engine.facade import Engine, Limits
from app.http import bodies
from app.http import oip as http_oip
from app.pipeline.decode import decode
from app.pipeline.image_scan import ImageLimits
from app.protocols.oip import tensors as oip_tensors
from tests.support.fakes import (
    FAKE_IMAGE_SIZE,
    fake_engine,
    fake_served_model,
    image_bytes,
    tiny_vit,
    write_model_folder,
)
from tests.support.inprocess import ClientFactory, serve_in_process
from tests.support.processes import chelsea_jpeg, drained, tiny_server
from tests.support.waiting import wait_until

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
    "1x64": lambda: encode("PNG", (1, 64)),
    "640x10": lambda: encode("JPEG", (640, 10)),
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


# -- work not proportional to the bytes: refused from the header, the decoder never run -------------------------


def thin_png(width: int, height: int) -> bytes:
    """A valid PNG, every row the same zeros: 1x60000 in about 300 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * height, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def jpeg_with_scans(count: int) -> bytes:
    """A small progressive JPEG with its last scan repeated until it has `count`."""
    data = encode("JPEG", (64, 48), progressive=True)
    last = data.rfind(b"\xff\xda")
    return data[:last] + data[last:-2] * (count - data.count(b"\xff\xda") + 1) + data[-2:]


def jpeg_with_segments(segment: bytes, count: int) -> bytes:
    jpeg = encode("JPEG")
    return jpeg[:2] + segment * count + jpeg[2:]


def gif_with_blocks(count: int) -> bytes:
    """A GIF with `count` empty comment extensions before its frame (PIL reads each in Python)."""
    gif = encode("GIF")
    header = 13 + (3 << ((gif[10] & 0x07) + 1))  # and the global palette
    return gif[:header] + b"\x21\xfe\x00" * count + gif[header:]


COSTLY: dict[str, tuple[bytes, str]] = {
    "png-1x60000": (thin_png(1, 60_000), "image_aspect_ratio"),
    "png-60000x1": (thin_png(60_000, 1), "image_aspect_ratio"),
    "jpeg-3000-scans": (jpeg_with_scans(3000), "image_too_many_scans"),
    "jpeg-500-comments": (jpeg_with_segments(b"\xff\xfe\x00\x04hi", 500), "image_too_many_segments"),
    "jpeg-500-exif-segments": (
        jpeg_with_segments(b"\xff\xe1\x00\x0cExif\x00\x00MM\x00*", 500),
        "image_too_many_segments",
    ),
    "jpeg-300-icc-segments": (
        jpeg_with_segments(b"\xff\xe2" + struct.pack(">H", 1000) + b"ICC_PROFILE\x00" + b"p" * 986, 300),
        "image_too_many_segments",
    ),
    "png-300000-chunks": (with_png_chunk(encode("PNG"), png_chunk(b"abCd", b"") * 300_000), "image_too_many_chunks"),
    "png-20000-text-chunks": (
        with_png_chunk(encode("PNG"), png_chunk(b"tEXt", b"k\x00v") * 20_000),
        "image_too_many_chunks",
    ),
    "gif-1000000-blocks": (gif_with_blocks(1_000_000), "image_too_many_chunks"),
    "png-1-mb-of-text": (
        with_png_chunk(encode("PNG"), png_chunk(b"zTXt", b"k\x00\x00" + b"z" * (1 << 20))),
        "image_too_much_metadata",
    ),
}
COSTLY_LIMITS = Limits(16, request_timeout_s=30, image=ImageLimits(max_pixels=1_000_000, max_metadata_bytes=1 << 20))


def test_the_settings_defaults_are_the_image_limits_defaults() -> None:
    assert Limits.from_settings(Settings()).image == ImageLimits()


@pytest.mark.parametrize(("data", "code"), list(COSTLY.values()), ids=list(COSTLY))
async def test_an_image_that_costs_more_than_its_pixels_is_413_before_the_decoder_runs(
    serve: ClientFactory, monkeypatch: pytest.MonkeyPatch, data: bytes, code: str
) -> None:
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    async with serve(fake_engine(limits=COSTLY_LIMITS)) as client:
        response = await client.post("/v1/classify", content=data, headers={"Content-Type": "image/*"})

        assert (response.status_code, response.json()["code"]) == (413, code), response.text
        assert response.json()["error"]
        assert not loads  # refused from the header: the decoder never ran
        monkeypatch.undo()
        assert (await client.get("/readyz")).status_code == 200
        assert (
            await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
        ).status_code == 200


async def test_the_size_the_resize_would_produce_is_bounded(serve: ClientFactory) -> None:
    """With the aspect ratio lifted, 1x60000 still never reaches the resize: 36 x 2,160,000 pixels (the fake model's
    short side is 36) is over the pixel limit, though 60,000 pixels sent are not."""
    limits = Limits(16, request_timeout_s=30, image=ImageLimits(max_pixels=1_000_000, max_aspect_ratio=1e6))
    async with serve(fake_engine(limits=limits)) as client:
        response = await client.post("/v1/classify", content=thin_png(1, 60_000), headers={"Content-Type": "image/*"})
        assert (response.status_code, response.json()["code"]) == (413, "image_output_too_large")
        assert "77760000 pixels" in response.json()["error"]


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("fmt", ["baseline", "progressive", "png"])
async def test_photographs_pass_the_checks_with_the_same_pixels(client: httpx.AsyncClient, name: str, fmt: str) -> None:
    image = Image.fromarray(getattr(skimage.data, name)())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if fmt == "png" else "JPEG", progressive=fmt == "progressive", quality=90)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as opened:
        expected = np.asarray(opened.convert("RGB"))

    assert np.array_equal(np.asarray(decode(data, limits=ImageLimits())), expected)
    response = await client.post("/v1/classify", content=data, headers={"Content-Type": "image/*"})
    assert response.status_code == 200, response.text


async def test_readiness_says_so_while_every_decode_thread_is_held_past_its_deadline(
    serve: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode that outlives its request (a pathological image no header check knows) holds its thread: the others
    go on, and when none is left, /readyz answers 503 with the reason, until the decodes end."""
    release = threading.Event()
    stuck = b"a decode that never ends"
    engine = fake_engine(limits=Limits(16, request_timeout_s=0.2))
    served = engine.model()
    prepare = served.prepare

    def held(data: bytes, limits: ImageLimits) -> Any:
        if data == stuck:
            assert release.wait(30)
        return prepare(RED, limits)

    monkeypatch.setattr(served, "prepare", held)
    async with serve(engine) as client:
        threads = engine.decode_pool.threads
        for held_so_far in range(threads):
            assert (await client.get("/readyz")).status_code == 200
            response = await client.post("/v1/classify", content=stuck, headers={"Content-Type": "image/*"})
            assert (response.status_code, engine.decode_pool.overdue()) == (504, held_so_far + 1)

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "decode threads are held by decodes past their request's deadline" in ready.json()["error"]
        assert (await client.get("/healthz")).status_code == 200  # live, not ready

        release.set()
        await wait_until(lambda: engine.ready)
        assert (await client.get("/readyz")).status_code == 200
        assert (
            await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
        ).status_code == 200


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
        corpus += [(data, "image/*") for data, _ in COSTLY.values()]
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


# -- work bounded by the limits, not by the body: parsers, shapes, labels, admission, slow clients -----------------

EMPTY_ELEMENTS = 250_000  # 1 MB of empty BYTES elements, or 250k JSON numbers: bodies whose cost is their count
S = FAKE_IMAGE_SIZE


def oip_binary(inputs: list[dict[str, Any]], data: bytes) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": inputs})
    return header + data, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def bytes_tensor(shape: list[int], size: int) -> list[dict[str, Any]]:
    return [{"name": "IMAGE", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": size}}]


def pixels_json(data: Any, shape: list[int] | None = None) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "PIXELS", "shape": shape or [1, 3, S, S], "datatype": "FP32", "data": data}
    return orjson.dumps({"inputs": [tensor]}), {"Content-Type": "application/json"}


EMPTY = b"\x00\x00\x00\x00" * EMPTY_ELEMENTS
# (path, body and headers, the parse that runs off the loop (module, name), status, code)
COSTLY_BODIES: dict[str, Callable[[], tuple[str, tuple[bytes, dict[str, str]], tuple[Any, str], int, str]]] = {
    "binary BYTES, declared": lambda: (
        "/v2/models/fake/infer",
        oip_binary(bytes_tensor([EMPTY_ELEMENTS, 1], len(EMPTY)), EMPTY),
        (http_oip, "parse_request"),
        413,
        "too_many_images",
    ),
    "binary BYTES, shape lies": lambda: (
        "/v2/models/fake/infer",
        oip_binary(bytes_tensor([1, 1], len(EMPTY)), EMPTY),
        (http_oip, "parse_request"),
        400,
        "invalid_shape",
    ),
    "raw BYTES": lambda: (
        "/v2/models/fake/infer",
        (EMPTY, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}),
        (http_oip, "parse_request"),
        413,
        "too_many_images",
    ),
    "JSON FP32 numbers": lambda: (
        "/v2/models/fake_pixels/infer",
        pixels_json([0] * EMPTY_ELEMENTS),
        (http_oip, "parse_request"),
        400,
        "json_too_complex",
    ),
    "JSON nested arrays": lambda: (
        "/v2/models/fake_pixels/infer",
        pixels_json([[]] * EMPTY_ELEMENTS),
        (http_oip, "parse_request"),
        400,
        "json_too_complex",
    ),
    "JSON base64 images": lambda: (
        "/v1/classify",
        (orjson.dumps({"images": [""] * EMPTY_ELEMENTS}), {"Content-Type": "application/json"}),
        (bodies, "_read_json"),
        413,
        "too_many_images",
    ),
}


@pytest.mark.parametrize("case", list(COSTLY_BODIES.values()), ids=list(COSTLY_BODIES))
async def test_a_body_that_costs_its_element_count_is_refused_by_the_limits_off_the_loop_while_probes_answer(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, case: Callable[[], Any]
) -> None:
    path, (body, headers), (module, name), status, code = case()
    parse, entered, gate = getattr(module, name), threading.Event(), threading.Event()

    def held_parse(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert gate.wait(timeout=30), "the parse held the event loop: no probe could answer"
        return parse(*args, **kwargs)

    walked: list[int] = []  # BYTES elements each unpack read: bounded by the limit, never by the body
    unpack = oip_tensors.unpack_bytes

    def counted_unpack(*args: Any, **kwargs: Any) -> list[bytes]:
        out = unpack(*args, **kwargs)
        walked.append(len(out))
        return out

    monkeypatch.setattr(module, name, held_parse)
    monkeypatch.setattr(oip_tensors, "unpack_bytes", counted_unpack)

    request = asyncio.create_task(client.post(path, content=body, headers=headers))
    assert await asyncio.to_thread(entered.wait, 10)
    for _ in range(20):  # each answered while the parse is held on its thread: the loop is free
        assert (await client.get("/healthz")).status_code == 200
    assert not request.done()
    gate.set()
    response = await request
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert max(walked, default=0) <= 16 + 1  # the fake engine's max_images_per_request, and the one past it
    assert (await client.get("/readyz")).status_code == 200


def pixels_binary(values: np.ndarray) -> tuple[bytes, dict[str, str]]:
    tensor = [
        {"name": "PIXELS", "shape": [1, 3, S, S], "datatype": "FP32", "parameters": {"binary_data_size": 12 * S * S}}
    ]
    return oip_binary(tensor, values.astype("<f4").tobytes())


PER_IMAGE = 3 * S * S
BAD_TENSORS: dict[str, tuple[tuple[bytes, dict[str, str]], int, str]] = {
    "product overflows int64": (pixels_json(None, [2**62, 4, 1, 1]), 400, "invalid_shape"),
    "batch past the limit": (pixels_json(None, [2**62, 3, S, S]), 413, "too_many_images"),
    "negative batch": (pixels_json(None, [-1, 3, S, S]), 400, "invalid_shape"),
    "negative dims": (pixels_json(None, [-2, 3, -S, S]), 400, "invalid_shape"),
    "empty batch": (pixels_json([], [0, 3, S, S]), 400, "no_image"),
    "boolean dim": (pixels_json(None, [True, 3, S, S]), 422, "invalid_body"),
    "null values": (pixels_json([None] * PER_IMAGE), 400, "invalid_tensor"),
    "string values": (pixels_json(["0.5"] * PER_IMAGE), 400, "invalid_tensor"),
    "boolean values": (pixels_json([True] * PER_IMAGE), 400, "invalid_tensor"),
    "past float32's range": (pixels_json([1e39] * PER_IMAGE), 400, "invalid_tensor"),
    "integer past float64's range": (
        (
            json.dumps(
                {"inputs": [{"name": "PIXELS", "shape": [1, 3, S, S], "datatype": "FP32", "data": [10**400]}]}
            ).encode(),
            {},
        ),
        400,
        "invalid_json",
    ),
    "binary NaN": (pixels_binary(np.full(PER_IMAGE, np.nan)), 400, "invalid_tensor"),
    "binary infinity": (pixels_binary(np.full(PER_IMAGE, np.inf)), 400, "invalid_tensor"),
    "too few values": (pixels_json([0.5] * (PER_IMAGE - 1)), 400, "invalid_tensor"),
    "BYTES shape overflows": (oip_binary(bytes_tensor([2**62, 2**62], 0), b""), 400, "invalid_shape"),
}


@pytest.mark.parametrize(("request_", "status", "code"), list(BAD_TENSORS.values()), ids=list(BAD_TENSORS))
async def test_bad_shapes_and_values_are_a_clear_4xx_never_a_500_or_null_logits(
    client: httpx.AsyncClient, request_: tuple[bytes, dict[str, str]], status: int, code: str
) -> None:
    body, headers = request_
    path = "/v2/models/fake/infer" if "IMAGE" in body[:200].decode("latin-1") else "/v2/models/fake_pixels/infer"
    response = await client.post(path, content=body, headers=headers)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    good, headers = pixels_json([0.5] * PER_IMAGE)
    assert (await client.post("/v2/models/fake_pixels/infer", content=good, headers=headers)).status_code == 200


async def test_made_up_model_names_never_become_metric_labels_and_refusals_count_under_their_route(
    tmp_path: Path,
) -> None:
    write_model_folder(tmp_path, "tiny", tiny_vit())
    settings = Settings(
        model_repository=tmp_path, model=["tiny"], model_control=True, api_keys=[SecretStr("k")], drain_timeout_s=5
    )
    auth = {"Authorization": "Bearer k"}
    async with serve_in_process(Engine.load(settings), settings) as client:
        before = len((await client.get("/metrics", headers=auth)).text)
        for n in range(40):
            assert (await client.post(f"/v1/models/made-up-{n}/load", headers=auth)).status_code in (400, 404)
            assert (await client.post(f"/v2/repository/models/made-up-{n}/unload", headers=auth)).status_code >= 400
        assert (await client.post("/v1/classify", content=RED)).status_code == 401
        assert (
            await client.post("/v1/classify", content=RED, headers={"Authorization": "Bearer no"})
        ).status_code == 401
        metrics = (await client.get("/metrics", headers=auth)).text
    assert "made-up" not in metrics and 'model="other"' in metrics
    assert len(metrics) < before + 20_000  # a few new series, not 80
    assert 'code="401",endpoint="/v1/classify"' in metrics
    assert 'code="401",endpoint="unmatched"' not in metrics


async def test_images_past_the_decoding_bytes_budget_are_503_at_once_and_the_budget_comes_back(
    serve: ClientFactory,
) -> None:
    served = fake_served_model(batching=BatchingConfig(max_queue_bytes=len(RED) * 3 // 2))
    prepare, entered, gate = served.prepare, threading.Event(), threading.Event()

    def held_prepare(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert gate.wait(timeout=30)
        return prepare(*args, **kwargs)

    served.prepare = held_prepare  # type: ignore[method-assign]
    async with serve(fake_engine(served)) as client:
        first = asyncio.create_task(client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"}))
        assert await asyncio.to_thread(entered.wait, 10)
        assert served.batcher.decoding_bytes == len(RED)  # alone, a request is admitted whatever its size
        shed = await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
        assert (shed.status_code, shed.json()["code"], shed.headers["Retry-After"]) == (503, "queue_full", "1")
        assert not first.done()
        gate.set()
        assert (await first).status_code == 200
        assert served.batcher.decoding_bytes == 0
        again = await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
        assert again.status_code == 200


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket's timeout)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_stalled_uploads_slowloris_and_idle_connections_are_closed_while_honest_clients_are_served(
    tmp_path: Path,
) -> None:
    jpeg = chelsea_jpeg()
    limits = ["--header-timeout-s", "2", "--body-timeout-s", "2", "--keep-alive-timeout-s", "2"]
    caps = ["--max-connections", "40", "--max-header-count", "50", "--max-header-bytes", "8192"]
    with tiny_server(tmp_path, *limits, *caps) as (url, server):
        host, port = url.removeprefix("http://").split(":")

        def connect(data: bytes = b"") -> socket.socket:
            sock = socket.create_connection((host, int(port)), timeout=60)  # a bound on each read, never reached
            sock.sendall(data)
            return sock

        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/classify", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
            baseline = rss_bytes(server.process.pid)
            upload = (
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 60000000\r\n\r\n"
            )
            stalled = [connect(upload + jpeg[:60_000]) for _ in range(6)]  # the last bytes withheld
            slowloris = [connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ") for _ in range(6)]
            silent = [connect() for _ in range(12)]
            for _ in range(5):  # meanwhile honest clients and probes are served
                assert client.get("/healthz").status_code == 200
                assert (
                    client.post("/v1/classify", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
                )
            for sock in stalled + slowloris:  # each closed by its timeout, with a JSON 408
                answer = read_until_closed(sock)
                assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer, answer
            assert all(read_until_closed(sock) == b"" for sock in silent)  # nothing to answer: closed
            for sock in stalled + slowloris + silent:
                sock.close()

            huge_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
            many_headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 1000 + b"\r\n"
            for request, code in ((huge_header, b"headers_too_large"), (many_headers, b"too_many_headers")):
                answer = raw_exchange(url, request)
                assert answer.startswith(b"HTTP/1.1 431") and code in answer, answer

            idle = [connect() for _ in range(41)]  # past max_connections
            try:
                deadline = time.monotonic() + 30
                while (refused := client.get("/v1/models")).status_code != 503 and time.monotonic() < deadline:
                    time.sleep(0.05)  # until the server has accepted them all (connect() returns before that)
                assert (refused.status_code, refused.json()["code"]) == (503, "too_many_connections")
                assert refused.headers["Retry-After"] == "1"
                assert httpx.get(f"{url}/healthz").status_code == 200  # the probes are always served
            finally:
                for sock in idle:
                    sock.close()
            assert client.get("/readyz").status_code == 200
            after = rss_bytes(server.process.pid)
    assert after < baseline * 1.25 + (32 << 20), (baseline, after)


@pytest.mark.slow
def test_a_request_on_an_idle_kept_alive_connection_as_the_drain_begins_is_answered_not_reset(tmp_path: Path) -> None:
    with tiny_server(tmp_path, "--log-format", "json") as (url, server):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b'{"status":"alive"}'  # and the connection is kept alive
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "Shutting down" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.01)  # until uvicorn's drain has begun: it used to close idle connections at this moment
        connection.request("POST", "/v1/classify", body=chelsea_jpeg(), headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        assert (response.status, orjson.loads(response.read())["code"]) == (503, "not_ready")
        assert response.getheader("connection") == "close"
        connection.close()
        drained(server)
