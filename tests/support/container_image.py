"""The container image built from the Dockerfile with whichever engine this machine has: Docker when its daemon
answers, else buildah or podman (installed from Debian's registry when missing, as root). Where the base image
cannot be pulled, a Debian base made once with debootstrap (cached outside the repository) is imported under the
official name, so the Dockerfile builds unchanged. The host's pip settings (indexes, find-links, constraints) reach
the build's RUN steps through bind mounts, never through the Dockerfile.

Standard library only: `make image` runs it with the system's Python (`python3 -m tests.support.container_image`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BASE = "docker.io/library/python:3.11-slim-bookworm"
CACHE = Path(os.environ.get("VIT_IMAGE_CACHE", Path.home() / ".cache" / "vit-serve"))
BASE_TAR = CACHE / "python-3.11-slim-bookworm.debootstrap.tar"
DEBIAN_MIRROR = os.environ.get("VIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The official image's Python lives in /usr/local; Debian's is /usr/bin/python3, and python-is-python3 gives `python`.
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
GENERATED_PIP_CONF = CACHE / "pip-build-config"


def default_tag() -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"vit-serve:{version}"


def run(command: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def succeeds(command: Sequence[str], timeout_s: float = 60) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=timeout_s, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"needs {', '.join(packages)}: install them (or Docker) and run again")
    print(f"installing Debian's {' '.join(packages)} (needs root)", file=sys.stderr)
    run(["apt-get", "update", "-qq"])
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)


def engine() -> str:
    """docker when a daemon answers; else buildah (podman's builder, and what the image checks run with) or podman."""
    if shutil.which("docker") and succeeds(["docker", "info"], timeout_s=20):
        return "docker"
    for name in ("buildah", "podman"):
        if shutil.which(name):
            return name
    apt_install("buildah", "podman")
    return "buildah"


def image_exists(tool: str, name: str) -> bool:
    if tool == "buildah":
        return succeeds(["buildah", "inspect", "--type", "image", name])
    return succeeds([tool, "image", "inspect", name])


def ensure_base(tool: str) -> None:
    """The Dockerfile's base image, under its official name: present, pulled, or made from Debian's packages."""
    if image_exists(tool, BASE) or succeeds([tool, "pull", BASE], timeout_s=600):
        return
    print(f"{BASE} cannot be pulled: importing a Debian base made with debootstrap", file=sys.stderr)
    if not BASE_TAR.exists():
        make_base_tar()
    if tool == "buildah":
        container = run(["buildah", "from", "scratch"], capture_output=True).stdout.strip()
        run(["buildah", "add", "--quiet", container, str(BASE_TAR), "/"])
        run(["buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", "python3", container])
        run(["buildah", "commit", "--quiet", "--rm", container, BASE])
    else:
        run([tool, "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', str(BASE_TAR), BASE])


def make_base_tar() -> None:
    """debootstrap's minimal bookworm with Python 3.11, without apt's caches, as a tar in the cache (a minute)."""
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        rootfs = Path(scratch) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={BASE_PACKAGES}",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ]
        )
        for cache in ("var/cache/apt", "var/lib/apt/lists"):
            for entry in (rootfs / cache).rglob("*"):
                if entry.is_file():
                    entry.unlink()
        (rootfs / "etc/resolv.conf").write_text("")  # debootstrap copied the host's; runtimes mount their own
        partial = BASE_TAR.with_suffix(".partial")
        run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.rename(BASE_TAR)


def host_pip_settings() -> dict[str, str]:
    """The host's effective pip configuration (files and PIP_* variables), as `pip config list` reports it."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    settings: dict[str, str] = {}
    for line in sorted(listed.splitlines(), key=lambda line: line.startswith(":env:")):  # variables win
        name, _, value = line.partition("=")
        settings[name.split(".", 1)[1]] = value.strip("'")
    return settings


def pip_volumes() -> list[str]:
    """`-v` options that give the build's RUN steps the host's pip settings: one pip.conf (in /etc/xdg/pip, where
    no image has its own) and, read-only at the same paths, the local indexes, wheel folders and files it names."""
    settings = host_pip_settings()
    settings.pop("disable-pip-version-check", None)
    if not settings:
        return []
    GENERATED_PIP_CONF.mkdir(parents=True, exist_ok=True)
    mounts: set[Path] = set()
    for word in " ".join(settings.values()).split():
        path = Path(word.removeprefix("file://")) if word.startswith(("/", "file://")) else None
        if path is None or not path.exists():
            continue
        if path.is_file() and path.parent == Path("/etc/xdg/pip"):
            shutil.copy(path, GENERATED_PIP_CONF / path.name)  # the mounted folder hides the original
        else:
            mounts.add(path.parent if path.name == "simple" else path)  # an index's pages link to ../files
    lines = ["[global]", *(f"{name} = {value}" for name, value in sorted(settings.items()))]
    (GENERATED_PIP_CONF / "pip.conf").write_text("\n".join(lines) + "\n")
    volumes = [f"{GENERATED_PIP_CONF}:/etc/xdg/pip:ro"] + [f"{path}:{path}:ro" for path in sorted(mounts)]
    return [option for volume in volumes for option in ("-v", volume)]


def build(
    tag: str, build_args: Sequence[str] = (), *, context: Path = REPO, no_cache: bool = False, tool: str | None = None
) -> str:
    """Build the Dockerfile in `context` as `tag` (with `tool`, or the machine's engine); the engine it used."""
    tool = tool or engine()
    ensure_base(tool)
    args = [option for arg in build_args for option in ("--build-arg", arg)]
    if no_cache:
        args.append("--no-cache")
    if tool == "docker":
        run(["docker", "build", "-t", tag, *args, str(context)])
        return tool
    command = "bud" if tool == "buildah" else "build"
    # docker format: the OCI format has no HEALTHCHECK. chroot isolation and the host's network: no cgroups needed.
    run(
        [
            tool,
            command,
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--format",
            "docker",
            "--layers",
            "--pull=false",
            *pip_volumes(),
            *args,
            "-t",
            tag,
            str(context),
        ]
    )
    return tool


@dataclass(frozen=True)
class Layer:
    created_by: str  # the instruction that made it
    size: int  # bytes, uncompressed


def layers(tag: str) -> list[Layer]:
    """The image's layers, newest first."""
    if engine() == "docker":
        listed = run(
            ["docker", "history", "--no-trunc", "--human=false", "--format", "{{json .}}", tag], capture_output=True
        )
        history = [json.loads(line) for line in listed.stdout.splitlines()]
        return [Layer(entry["CreatedBy"], int(entry["Size"])) for entry in history]
    if shutil.which("podman") is None:
        apt_install("podman")
    listed = run(["podman", "history", "--no-trunc", "--format", "json", tag], capture_output=True)
    return [Layer(entry["CreatedBy"], int(entry["size"])) for entry in json.loads(listed.stdout)]


# -- running the built image with buildah (no Docker engine; podman cannot run containers on a cgroups-v1 host) --


def image_config(tag: str) -> dict[str, Any]:
    """The image's Docker-format configuration: User, Env, WorkingDir, Entrypoint, Cmd, Healthcheck, ..."""
    raw = json.loads(run(["buildah", "inspect", "--type", "image", tag], capture_output=True).stdout)
    config: dict[str, Any] = raw["Docker"]["config"]
    return config


@contextmanager
def container(tag: str) -> Iterator[str]:
    """A working container of the image (its root filesystem, its configuration); removed at the end."""
    name = f"vit-serve-{uuid.uuid4().hex[:8]}"
    subprocess.run(["buildah", "from", "--pull=false", "--name", name, tag], capture_output=True, check=True)
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False)


def run_command(name: str, command: Sequence[str], env: dict[str, str], volumes: dict[Path, str]) -> list[str]:
    """`buildah run` of `command` in container `name` as the image's user, with the host's network (as `docker run
    --network host`), `env` added to the image's and `volumes` (host path: container path) mounted read-only."""
    options = ["--isolation", "chroot", "--network", "host"]
    options += [option for key, value in env.items() for option in ("-e", f"{key}={value}")]
    options += [option for source, target in volumes.items() for option in ("-v", f"{source}:{target}:ro")]
    return ["buildah", "run", *options, name, "--", *command]


def run_in(
    name: str, command: Sequence[str], env: dict[str, str] | None = None, volumes: dict[Path, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_command(name, command, env or {}, volumes or {}), capture_output=True, text=True, timeout=300, check=False
    )


def started_command(runner: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """The PID of the command a `buildah run` process started (the child of its buildah-chroot-exec). `buildah run`
    does not pass signals on (SIGTERM ends it and orphans the command), so this is the process to signal, as
    `docker stop` signals a container's first process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        for pid, parent in parents.items():
            ancestor = parent
            while ancestor in parents and ancestor != runner.pid:
                ancestor = parents[ancestor]
            if ancestor == runner.pid and command_line(parent).startswith("buildah-chroot-exec"):
                return pid
        if runner.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no command found under `buildah run` (PID {runner.pid})")


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def mountpoint(name: str) -> Path:
    """Container `name`'s root filesystem, mounted on the host."""
    return Path(run(["buildah", "mount", name], capture_output=True).stdout.strip())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m tests.support.container_image", description=__doc__)
    parser.add_argument("command", choices=["build", "base", "layers"])
    parser.add_argument("--tag", default=default_tag())
    parser.add_argument("--build-arg", action="append", default=[], help="KEY=VALUE, as `docker build` takes it")
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "base":
        ensure_base(engine())
    elif args.command == "build":
        print(f"built {args.tag} with {build(args.tag, args.build_arg, no_cache=args.no_cache)}")
    else:
        for layer in layers(args.tag):
            print(f"{layer.size / 2**20:10.1f} MiB  {layer.created_by[:140]}")


if __name__ == "__main__":
    main()
