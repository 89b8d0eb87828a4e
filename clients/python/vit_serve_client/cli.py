"""The client's `vit-serve` command: `predict`. Each option is a flag and a `VIT_CLIENT_<NAME>` variable (the flag
wins); the environment is read when the command runs, never at import.

Exit status: 0 when every image was classified, 1 when any failed, 2 when the run could not start (a bad option, a
missing path, a server that cannot be reached, ...: one line on stderr saying why).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vit_serve_client.http import DEFAULT_URL
from vit_serve_client.sizing import IN_FLIGHT_S, fit

ENV_PREFIX = "VIT_CLIENT_"
SERVER_COMMANDS = ("serve", "download")
UNKNOWN = fit({})  # the sizes for a server that advertises no speed
TRUE, FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})
USAGE = """usage: vit-serve predict PATH [PATH ...] [options]

The client of a vit-serve server (vit-serve-client).

commands:
  predict   Classify every image under PATHs through a running server (vit-serve predict --help).

`serve` and `download` are the server's: pip install vit-serve."""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


def predict_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser of `vit-serve predict`, with the `VIT_CLIENT_*` variables of `environ` as its defaults."""
    parser = argparse.ArgumentParser(
        prog="vit-serve predict",
        description="Classify every image under PATHs through a running server: one line per image (JSON Lines, or "
        "CSV for a .csv output) as it goes, a progress bar, and a summary on stderr.",
        epilog="Every option is also an environment variable, shown in brackets; a flag wins over its variable. "
        "Exit status: 0 when every image was classified, 1 when any failed, 2 when the run could not start.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="Image files, and folders walked for them.")
    flags = Flags(parser, environ)
    flags.add("--url", default=DEFAULT_URL, meaning="The server.")
    flags.add("--model", meaning="A served model. Default: the server's default model.")
    flags.add("--top-k", parse=positive_int, default="5", metavar="K", meaning="Classes per image.")
    flags.add(
        "--batch",
        parse=positive_int,
        metavar="N",
        meaning="Images per request. Default: fitted to the speed the server measured for the model (about "
        f"{IN_FLIGHT_S:g} s of its work in flight), else {UNKNOWN.batch}.",
    )
    flags.add(
        "--concurrency",
        parse=positive_int,
        metavar="N",
        meaning=f"Requests in flight at once. Default: fitted like --batch, else {UNKNOWN.concurrency}.",
    )
    flags.add("--output", parse=Path, metavar="FILE", meaning="Where lines go: .jsonl or .csv. Default: stdout.")
    flags.add("--resume", flag=True, default="false", meaning="Skip what the output holds without an error; append.")
    flags.add("--api-key", metavar="KEY", meaning="Sent as Authorization: Bearer KEY.")
    flags.add("--timeout-s", parse=positive_float, default="60", metavar="S", meaning="Seconds per request.")
    flags.add(
        "--attempts",
        parse=positive_int,
        default="5",
        metavar="N",
        meaning="Tries per request, in all, on 503/429 and connection errors.",
    )
    flags.add(
        "--wait-s",
        parse=non_negative_float,
        default="300",
        metavar="S",
        meaning="Seconds to wait for a server that is warming up to become ready.",
    )
    flags.add("--progress", flag=True, default="true", meaning="A progress bar on stderr, with images/s and ETA.")
    if flags.invalid:
        parser.error("; ".join(flags.invalid))
    return parser


class Flags:
    """Adds options to a parser: each a flag, its variable `VIT_CLIENT_<NAME>` (from `environ`, its default where
    set) and a built-in default (a string, parsed like the flag's value), all three in its help."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ
        self.invalid: list[str] = []  # variables whose value the option refuses

    def add(
        self,
        name: str,
        *,
        meaning: str,
        parse: Callable[[str], Any] = str,
        default: str | None = None,
        flag: bool = False,
        metavar: str | None = None,
    ) -> None:
        env = ENV_PREFIX + name.removeprefix("--").replace("-", "_").upper()
        shown = "" if default is None else f" Default: {default}."
        text = f"{meaning}{shown} [{env}]"
        given = self.environ.get(env)
        if flag:
            on = _boolean(given if given is not None else default)
            if on is None:
                self.invalid.append(f"{env}={given!r} is not one of {', '.join(sorted(TRUE | FALSE))}")
            self.parser.add_argument(name, action=argparse.BooleanOptionalAction, default=on, help=text)
            return
        if given is not None:
            try:
                parse(given)
            except ValueError:
                self.invalid.append(f"{env}={given!r} is not a valid {name} value")
        value = given if given is not None else default  # parsed by argparse like a flag's value
        self.parser.add_argument(name, type=parse, default=value, metavar=metavar, help=text)


def _boolean(text: str | None) -> bool | None:
    value = (text or "").strip().lower()
    return True if value in TRUE else False if value in FALSE else None


def predict(argv: list[str], environ: Mapping[str, str] | None = None) -> int:
    """`vit-serve predict ARGV`; the exit status."""
    from vit_serve_client.outputs import CsvWriter, JsonLinesWriter, done_before
    from vit_serve_client.predict import CannotStart, Options
    from vit_serve_client.predict import predict as run

    args = predict_parser(os.environ if environ is None else environ).parse_args(argv)
    output: Path | None = args.output
    if output is not None and output.exists() and not args.resume:
        return _cannot_start(f"{output} exists; add --resume to go on from it, or remove it")
    skip = done_before(output) if output is not None and args.resume else set()
    options = Options(
        url=args.url,
        model=args.model,
        top_k=args.top_k,
        batch=args.batch,
        concurrency=args.concurrency,
        api_key=args.api_key,
        timeout_s=args.timeout_s,
        attempts=args.attempts,
        wait_s=args.wait_s,
        progress=args.progress,
    )
    created = output is not None and not output.exists()
    try:
        stream = sys.stdout if output is None else output.open("a", newline="", encoding="utf-8")
    except OSError as exc:
        return _cannot_start(f"cannot write {output}: {exc.strerror or exc}")
    try:
        is_csv = output is not None and output.suffix == ".csv"
        writer = CsvWriter(stream, header=stream.tell() == 0) if is_csv else JsonLinesWriter(stream)
        summary = asyncio.run(run(args.paths, writer, options, skip=skip, say=_say))
    except CannotStart as reason:
        if created and output is not None:
            output.unlink()  # nothing was written: a run started again needs no --resume
        return _cannot_start(str(reason))
    finally:
        if stream is not sys.stdout:
            stream.close()
    if summary.stopped:
        again = "; run it again with --resume to go on" if output is not None else ""
        _say(f"vit-serve predict: stopped: {summary.stopped}{again}")
    _say(summary.text())
    return 1 if summary.failed or summary.not_sent else 0


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _cannot_start(reason: str) -> int:
    _say(f"vit-serve predict: {reason}")
    return 2


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else None
    if command == "predict":
        sys.exit(predict(args[1:]))
    if command in SERVER_COMMANDS:
        _say(f"vit-serve {command} is the server's: pip install vit-serve (vit-serve-client has predict only)")
        sys.exit(2)
    if command in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    print(USAGE if command is None else f"{USAGE}\n\nvit-serve: no command {command!r}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
