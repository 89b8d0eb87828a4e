"""Write perf_analyzer's --input-data file for an IMAGE (BYTES) input from real JPEG files.

A BYTES element in that file is base64 of its serialized form: a 4-byte little-endian length, then the bytes.

    python bench/perf_analyzer_input.py OUT.json [IMAGE ...]    (no images: scikit-image's chelsea, JPEG q90)
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
from pathlib import Path


def chelsea_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main(out: str, images: list[str]) -> None:
    blobs = [Path(p).read_bytes() for p in images] or [chelsea_jpeg()]
    entries = [{"IMAGE": {"b64": base64.b64encode(struct.pack("<I", len(b)) + b).decode()}} for b in blobs]
    Path(out).write_text(json.dumps({"data": entries}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
