"""A batch job's inputs: INPUT arguments -> the image paths they name, and a way to read each.

An INPUT is a folder (walked recursively for image files, sorted), a glob (`photos/**/*.jpg`), an image file, or a
listing of paths: a Parquet file (its `path` column) or a CSV file (its `path` column, else its first). A path with a
scheme (`s3://bucket/photos/`, `gs://...`) is read through fsspec, where the user has it installed with the
filesystem's package (s3fs, gcsfs, ...).
"""

from __future__ import annotations

import csv
import functools
import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.engine.predictor import ReadImage
from vit_serve_client.predict import IMAGE_SUFFIXES

LISTING_SUFFIXES = frozenset({".parquet", ".csv"})


class InputError(Exception):
    """An INPUT names nothing that can be read, as one line for a person."""


def find_inputs(inputs: Sequence[str]) -> list[str]:
    """Every image path the INPUTs name, in order, each once."""
    found: list[str] = []
    for item in inputs:
        paths = _remote(item) if _is_url(item) else _local(item)
        if not paths:
            raise InputError(f"no image files in {item!r}")
        found.extend(paths)
    return list(dict.fromkeys(found))


def reader(path: str) -> ReadImage:
    """A function that reads the image at `path` (local, or a URL through fsspec) when called."""
    if _is_url(path):
        return functools.partial(_read_url, path)
    return Path(path).read_bytes


def _local(item: str) -> list[str]:
    path = Path(item)
    if path.is_dir():
        return [str(p) for p in sorted(path.rglob("*")) if _is_image_name(p.name) and _is_file(p)]
    if path.suffix.lower() in LISTING_SUFFIXES and path.is_file():
        return _listing(path.read_bytes, path.suffix.lower(), item)
    if path.exists() or path.is_symlink():
        return [item]
    if glob.has_magic(item):
        return [p for p in sorted(glob.glob(item, recursive=True)) if _is_image_name(p) and _is_file(Path(p))]
    raise InputError(f"no such file or folder: {item}")


def _remote(item: str) -> list[str]:
    fsspec = _fsspec(item)
    suffix = Path(item.split("?", 1)[0]).suffix.lower()
    if suffix in LISTING_SUFFIXES:
        return _listing(functools.partial(_read_url, item), suffix, item)
    filesystem, _, paths = fsspec.get_fs_token_paths(item)  # a glob expanded
    found: list[str] = []
    for path in paths:
        if filesystem.isdir(path):
            found.extend(sorted(p for p in filesystem.find(path) if _is_image_name(p)))
        elif filesystem.exists(path):
            found.append(path)
    return [filesystem.unstrip_protocol(p) for p in found]


def _listing(read: ReadImage, suffix: str, item: str) -> list[str]:
    """The paths a Parquet or CSV listing holds (relative ones taken as they are)."""
    data = read()
    if suffix == ".parquet":
        import io

        import pyarrow.parquet as pq

        listing = pq.read_table(io.BytesIO(data))
        if "path" not in listing.column_names:
            raise InputError(f"{item}: a listing needs a 'path' column (it has {', '.join(listing.column_names)})")
        return [str(p) for p in listing.column("path").to_pylist() if p]
    rows = list(csv.reader(data.decode("utf-8").splitlines()))
    if not rows:
        return []
    column = rows[0].index("path") if "path" in rows[0] else 0
    body = rows[1:] if "path" in rows[0] else rows
    return [r[column] for r in body if len(r) > column and r[column]]


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _is_file(path: Path) -> bool:
    """A file, or a link (even a broken one: its row says it could not be read)."""
    return path.is_symlink() or path.is_file()


def _is_url(path: str) -> bool:
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def _read_url(url: str) -> bytes:
    with _fsspec(url).open(url, "rb") as stream:
        data: bytes = stream.read()
    return data


def _fsspec(url: str) -> Any:
    try:
        import fsspec
    except ImportError:
        raise InputError(
            f"{url}: reading URLs needs fsspec and its filesystem's package (pip install fsspec)"
        ) from None
    return fsspec
