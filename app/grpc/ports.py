"""Whether the gRPC port can be bound, checked before the warm-up: a taken port fails the start at once, with one clear
line (with workers, once, in the supervisor before any worker starts, not in each)."""

from __future__ import annotations

import socket


class PortUnavailable(Exception):
    """The gRPC port cannot be bound (taken by another process, or an address this host does not have)."""


def address(host: str, port: int) -> str:
    """`host:port` as gRPC reads it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ensure_free(host: str, port: int) -> None:
    """Bind `host:port` and release it at once; `PortUnavailable` if that fails. Without SO_REUSEPORT: a port held by
    any listening socket, one with SO_REUSEPORT included, is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed port's TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortUnavailable(unavailable(host, port, exc.strerror or str(exc))) from None


def unavailable(host: str, port: int, reason: str) -> str:
    return f"cannot serve gRPC on {address(host, port)}: {reason} (--grpc-port / VIT_GRPC_PORT; 0 turns gRPC off)"
