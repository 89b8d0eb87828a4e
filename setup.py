"""The one build step beyond setuptools' own: the gRPC modules generated from app/grpc/proto/*.proto.

`pip install .` and `pip install -e .` (and the wheel the Dockerfile builds) run it; grpcio-tools, the protocol
compiler, is a build requirement only (pyproject.toml). The generated modules are written next to the .proto file,
so an editable install imports them from the source tree; git ignores them.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = sorted((ROOT / "app" / "grpc" / "proto").glob("*.proto"))


def generate_grpc_modules() -> None:
    """protoc with paths from the project root: the modules import each other as `app.grpc.proto.<name>_pb2`."""
    from grpc_tools import protoc  # a build requirement

    root = str(ROOT)
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={root}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


class BuildWithProtos(build_py):
    def run(self) -> None:
        generate_grpc_modules()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
