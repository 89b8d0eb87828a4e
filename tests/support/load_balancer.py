"""A real nginx in front of real replicas, on loopback: the shipped upstream and proxy rules, local paths; for HTTP
(`vit-serve-proxy.conf`) or for gRPC (`vit-serve-grpc-proxy.conf`)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from grpc import FutureTimeoutError, channel_ready_future, insecure_channel

from tests.support.processes import wait_answering

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
PROXY_CONF = REPO / "deploy" / "nginx" / "vit-serve-proxy.conf"
GRPC_PROXY_CONF = REPO / "deploy" / "nginx" / "vit-serve-grpc-proxy.conf"
COMPOSE_SERVER = re.compile(r"^\s*server vit-serve:\d+ resolve(?P<params>[^;]*);$", re.MULTILINE)
ACCESS_LOG_FORMAT = "$status|$request_uri|$upstream_addr"  # retried: addresses ", "-separated


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert found, "nginx is not installed: `make test` installs Debian's nginx (as root)"
    return found


def shipped_upstream(replicas: list[str], name: str = "vit_serve") -> str:
    """The compose file's `upstream NAME` block, its DNS name replaced by `replicas` (host:port)."""
    block = re.search(rf"^\s*upstream {name} \{{.*?^\s*\}}$", NGINX_CONF.read_text(), re.MULTILINE | re.DOTALL)
    assert block, f"no upstream {name} block in {NGINX_CONF}"
    server = COMPOSE_SERVER.search(block.group(0))
    assert server, f"no `server vit-serve:PORT resolve ...;` line in {name} of {NGINX_CONF}"
    servers = "\n".join(f"        server {address}{server.group('params')};" for address in replicas)
    return COMPOSE_SERVER.sub(servers, block.group(0))


def nginx_config(folder: Path, port: int, replicas: list[str], *, grpc: bool = False) -> str:
    """One process in the foreground, as whoever runs the test (no workers switching user), every file in `folder`.
    With `grpc`, the gRPC server: `listen ... http2`, since Debian's nginx (1.22) predates the compose file's
    `http2 on` (1.25.1), which does the same."""
    upstream = shipped_upstream(replicas, "vit_serve_grpc" if grpc else "vit_serve")
    listen = f"127.0.0.1:{port} http2" if grpc else f"127.0.0.1:{port}"
    return f"""
daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{
    worker_connections 1024;
}}
http {{
    log_format balancer '{ACCESS_LOG_FORMAT}';
    access_log {folder}/access.log balancer;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{upstream}
    server {{
        listen {listen};
        location / {{
            include {GRPC_PROXY_CONF if grpc else PROXY_CONF};
        }}
    }}
}}
"""


@contextmanager
def nginx(folder: Path, port: int, replicas: list[str], *, grpc: bool = False) -> Iterator[str]:
    """nginx balancing over `replicas` on 127.0.0.1:`port`, until the block ends; yields its URL (with `grpc`, its
    host:port, once it accepts connections)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(nginx_config(folder, port, replicas, grpc=grpc))
    command = [nginx_binary(), "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    with (folder / "nginx.out").open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    address, log = f"127.0.0.1:{port}", (folder / "error.log").read_text
    try:
        if grpc:
            wait_accepting_grpc(address, log)
            yield address
        else:
            wait_answering(process, f"http://{address}", log, timeout_s=10)
            yield f"http://{address}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_accepting_grpc(address: str, log: Callable[[], str]) -> None:
    """Until a gRPC channel to `address` connects (10 s at most)."""
    with insecure_channel(address) as channel:
        try:
            channel_ready_future(channel).result(timeout=10)
        except FutureTimeoutError:
            raise AssertionError(f"nothing accepts gRPC at {address}: {log()}") from None


@dataclass(frozen=True, slots=True)
class Forwarded:
    """One request as nginx logged it: its status, and the replicas it tried, in order (the last one answered)."""

    status: int
    uri: str
    replicas: list[str]


def access_log(folder: Path) -> list[Forwarded]:
    entries = [line.split("|") for line in (folder / "access.log").read_text().splitlines()]
    return [Forwarded(int(status), uri, addresses.split(", ")) for status, uri, addresses in entries]
