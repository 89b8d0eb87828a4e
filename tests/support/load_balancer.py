"""A real nginx in front of real replicas, on loopback: the shipped upstream and proxy rules, local paths."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import wait_answering

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
PROXY_CONF = REPO / "deploy" / "nginx" / "vit-serve-proxy.conf"
COMPOSE_SERVER = re.compile(r"^\s*server vit-serve:8000 resolve(?P<params>[^;]*);$", re.MULTILINE)
ACCESS_LOG_FORMAT = "$status|$request_uri|$upstream_addr"  # retried: addresses ", "-separated


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert found, "nginx is not installed: `make test` installs Debian's nginx (as root)"
    return found


def shipped_upstream(replicas: list[str]) -> str:
    """The compose file's `upstream vit_serve` block, its DNS name replaced by `replicas` (host:port)."""
    block = re.search(r"^\s*upstream vit_serve \{.*?^\s*\}$", NGINX_CONF.read_text(), re.MULTILINE | re.DOTALL)
    assert block, f"no upstream vit_serve block in {NGINX_CONF}"
    server = COMPOSE_SERVER.search(block.group(0))
    assert server, f"no `server vit-serve:8000 resolve ...;` line in {NGINX_CONF}"
    servers = "\n".join(f"        server {address}{server.group('params')};" for address in replicas)
    return COMPOSE_SERVER.sub(servers, block.group(0))


def nginx_config(folder: Path, port: int, replicas: list[str]) -> str:
    """One process in the foreground, as whoever runs the test (no workers switching user), every file in `folder`."""
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
{shipped_upstream(replicas)}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include {PROXY_CONF};
        }}
    }}
}}
"""


@contextmanager
def nginx(folder: Path, port: int, replicas: list[str]) -> Iterator[str]:
    """nginx balancing over `replicas` on 127.0.0.1:`port`, until the block ends; yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(nginx_config(folder, port, replicas))
    command = [nginx_binary(), "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    with (folder / "nginx.out").open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(process, url, (folder / "error.log").read_text, timeout_s=10)
        yield url
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True, slots=True)
class Forwarded:
    """One request as nginx logged it: its status, and the replicas it tried, in order (the last one answered)."""

    status: int
    uri: str
    replicas: list[str]


def access_log(folder: Path) -> list[Forwarded]:
    entries = [line.split("|") for line in (folder / "access.log").read_text().splitlines()]
    return [Forwarded(int(status), uri, addresses.split(", ")) for status, uri, addresses in entries]
