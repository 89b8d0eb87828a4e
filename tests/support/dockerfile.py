"""The Dockerfile read as data: its stages and instructions, for tests of the image and of the compose file."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical = text.replace("\\\n", " ")
    lines = [line.strip() for line in logical.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def healthcheck_command() -> list[str]:
    (args,) = [args for name, args in stages()[-1] if name == "HEALTHCHECK"]
    command: list[str] = json.loads(args.split(" CMD ", 1)[1])
    return command


def runtime_env() -> dict[str, str]:
    """The variables the runtime stage's `ENV` instructions set (`ENV KEY=value ...`)."""
    pairs = [word for name, args in stages()[-1] if name == "ENV" for word in shlex.split(args)]
    return dict(pair.split("=", 1) for pair in pairs)
