"""mkdocs hook: fills the reference pages from the code when the site is built.

A page asks for a generated part with a marker, `<!-- reference:NAME -->`, where NAME is one of `GENERATORS`; the
marker is replaced by the Markdown that generator makes. Nothing generated is committed: a setting, metric, error
code, CLI flag or endpoint added to the code is in the next build of the reference by itself.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ref_cli
import ref_errors
import ref_metrics
import ref_openapi
import ref_settings

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `app` from this checkout, also where it is not installed
    sys.path.insert(0, str(REPO))

# The marker, and the line after it that says, where the Markdown is read unbuilt (on GitHub), where the table is.
MARKER = re.compile(r"<!-- reference:(\w+) -->(?:\n_Generated when the site is built[^\n]*_)?")
GENERATORS: dict[str, Callable[[], str]] = {
    "settings": ref_settings.markdown,
    "metrics": ref_metrics.markdown,
    "errors": ref_errors.markdown,
    "cli": ref_cli.markdown,
    "openapi": ref_openapi.markdown,
}
OPENAPI_FILE = "reference/openapi.json"


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    """Publish the OpenAPI document beside its page, so that the page can link to it."""
    from mkdocs.structure.files import File

    content = json.dumps(ref_openapi.document(), indent=2) + "\n"
    files.append(File.generated(config, OPENAPI_FILE, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    def generate(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_uri}: no reference generator {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)
