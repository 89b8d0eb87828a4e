"""Small helpers for writing generated Markdown: table cells and values as code."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence


def cell(text: str) -> str:
    """Prose for a table cell: no HTML, no table breaks, no accidental emphasis."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|").replace("*", "\\*")


def code(text: str) -> str:
    """A value as inline code in a table cell."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
