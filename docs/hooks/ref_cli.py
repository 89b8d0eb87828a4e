"""The CLI reference: each subcommand's `--help`, as its parser prints it, and a table of its options where they are
declared on a settings model (with their environment variables)."""

from __future__ import annotations

import contextlib
import io
import os
import typing

from pydantic import BaseModel
from ref_settings import fields_table


def help_text(*args: str) -> str:
    """`vit-serve ARGS --help`, as printed at 100 columns."""
    from app.serve.cli import main

    out = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*args, "--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return out.getvalue().rstrip()


def subcommands() -> dict[str, type[BaseModel]]:
    """Each subcommand's name and the settings model its options come from."""
    from app.serve.cli import VitServe

    found: dict[str, type[BaseModel]] = {}
    for name, field in VitServe.model_fields.items():
        model = next(a for a in typing.get_args(field.annotation) if a is not type(None))
        found[name.replace("_", "-")] = model
    return found


def markdown() -> str:
    from app.config.settings import Settings

    parts = ["## vit-serve", "", "```text", help_text(), "```", ""]
    for name, model in subcommands().items():
        prefix = str(model.model_config.get("env_prefix", ""))
        doc = " ".join((model.__doc__ or "").split())
        parts += [f"## vit-serve {name}", "", doc, ""]
        if issubclass(model, Settings):
            parts += ["Its options are the [settings](settings.md), each a flag and a `VIT_*` variable.", ""]
        elif model.model_fields:  # options declared on the model; otherwise its own parser's help says them all
            parts += [fields_table(model, env_prefix=prefix), ""]
        parts += ["```text", help_text(name), "```", ""]
    return "\n".join(parts)
