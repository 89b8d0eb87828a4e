"""The error-code reference: every machine code a client can get, with its status and what it means.

Three places say codes: the error classes of `app.errors` (each with its `code`, its fault and docstring; its status
from the HTTP layer's one table, `app.http.error_status`), the raise
sites that give one of those classes a more specific `code="..."` (read from the source, with the message they
send), and the HTTP layer's own answers (an `(status, ..., "code")` call such as `error_response(401, ...,
"unauthorized")`, or a `{status: "code"}` table).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ref_text import cell, code, table

if TYPE_CHECKING:
    from app.errors import ServeError

APP = Path(__file__).resolve().parents[2] / "app"
CODE = re.compile(r"^[a-z]+(?:_[a-z]+)*$")
STATUSES = range(400, 600)
MAX_MESSAGES = 3


@dataclass
class ErrorCode:
    code: str
    statuses: set[int] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    faults: set[str] = field(default_factory=set)
    meanings: list[str] = field(default_factory=list)
    places: set[str] = field(default_factory=set)

    def add(
        self, status: int | None, meaning: str, *, cls: type[ServeError] | None = None, place: str | None = None
    ) -> None:
        if status is not None:
            self.statuses.add(status)
        if cls is not None:
            self.classes.add(cls.__name__)
            # an error raised while an image is decoded is pinned to that image by the engine: the image's fault
            image = place is not None and place.startswith("app/pipeline/") and cls.fault == "request"
            self.faults.add("image" if image else str(cls.fault))
        if meaning and meaning not in self.meanings:
            self.meanings.append(meaning)
        if place:
            self.places.add(place)


def error_classes() -> dict[str, type[ServeError]]:
    """Every subclass of `ServeError` defined in the app (the whole app is imported first, so all are known)."""
    import ref_service

    from app.errors import ServeError

    ref_service.app()
    found: dict[str, type[ServeError]] = {}
    pending: list[type[ServeError]] = [ServeError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def collect() -> dict[str, ErrorCode]:
    classes = error_classes()
    codes: dict[str, ErrorCode] = defaultdict(lambda: ErrorCode(""))

    def entry(name: str) -> ErrorCode:
        codes[name].code = name
        return codes[name]

    root = classes.pop("ServeError")
    entry(root.code).add(_status(root), "", cls=root)  # its docstring is about the hierarchy, not the code
    for cls in classes.values():
        if "code" in vars(cls):
            entry(cls.code).add(_status(cls), _docstring_meaning(cls), cls=cls)
    classes[root.__name__] = root
    for path in sorted(APP.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        place = str(path.relative_to(APP.parent))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call):
                _from_call(node, source, place, classes, entry)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    status, name = _constant(key), _constant(value)
                    if isinstance(status, int) and status in STATUSES and isinstance(name, str) and CODE.match(name):
                        entry(name).add(status, "", place=place)
    return dict(codes)


def _from_call(
    node: ast.Call, source: str, place: str, classes: dict[str, type[ServeError]], entry: Callable[[str], ErrorCode]
) -> None:
    keyword = next((k for k in node.keywords if k.arg == "code"), None)
    name = _constant(keyword.value) if keyword is not None else None
    if isinstance(name, str) and CODE.match(name):
        cls = classes.get(_called_name(node.func))
        message = _message(node.args[0], source) if node.args else ""
        entry(name).add(_status(cls) if cls else None, message, cls=cls, place=place)
        return
    constants = [_constant(arg) for arg in node.args]
    statuses = [c for c in constants if isinstance(c, int) and not isinstance(c, bool) and c in STATUSES]
    names = [c for c in constants if isinstance(c, str) and CODE.match(c)]
    if statuses and names:
        messages = [_message(arg, source) for arg in node.args[1:-1]]
        entry(names[-1]).add(statuses[0], next((m for m in messages if m), ""), place=place)


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _constant(node: ast.expr | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _message(node: ast.expr, source: str) -> str:
    """A message as sent, with the values it fills in shown as `{name}`; "" if it is not a literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append("{" + (ast.get_source_segment(source, value.value) or "…") + "}")
        return "".join(parts)
    return ""


def _status(cls: type[ServeError]) -> int:
    from app.http.error_status import status_of

    return status_of(cls)


def _fault_of_status(statuses: set[int]) -> str:
    """The fault of a code the HTTP layer answers by itself (no error class says it)."""
    if statuses and max(statuses) < 500:
        return "request"
    return "overload" if statuses & {503, 504} else "service"


def _docstring_meaning(cls: type) -> str:
    doc = " ".join((cls.__doc__ or "").split())
    return re.sub(r"^\d{3}(?: \([^)]*\))?: ", "", doc)


def _grpc_codes(class_names: set[str]) -> str:
    """The gRPC status of the error classes (`app.grpc.status`'s one table): an answer of the HTTP layer alone has
    none (its gRPC counterpart, if any, is in the gRPC guide)."""
    from app.grpc.status import code_of

    classes = error_classes()
    return ", ".join(sorted({code(code_of(classes[name]).name) for name in class_names if name in classes})) or "—"


def markdown() -> str:
    rows = []
    for error in sorted(collect().values(), key=lambda e: (min(e.statuses, default=999), e.code)):
        statuses = ", ".join(str(s) for s in sorted(error.statuses)) or "—"
        meanings = error.meanings[:MAX_MESSAGES] + (["…"] if len(error.meanings) > MAX_MESSAGES else [])
        raised = ", ".join(code(c) for c in sorted(error.classes)) or "the HTTP layer"
        faults = ", ".join(sorted(error.faults)) or _fault_of_status(error.statuses)
        grpc = _grpc_codes(error.classes)
        rows.append([statuses, grpc, code(error.code), faults, raised, "<br>".join(cell(m) for m in meanings)])
    return table(["status", "gRPC", "code", "fault", "raised as", "meaning, or the message sent"], rows)
