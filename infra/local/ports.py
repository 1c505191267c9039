"""Loopback ports: pick free ones, check explicit ones."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if a server could listen there now (SO_REUSEADDR, as servers set it: ports in
    TIME_WAIT after a restart count as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = LOOPBACK, avoid: set[int] | None = None) -> list[int]:
    """``count`` distinct free ports; their +10000 gRPC twins are not reserved (we set every port)."""
    chosen: list[int] = []
    avoid = set(avoid or ())
    held: list[socket.socket] = []
    try:
        while len(chosen) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)  # keep it bound so the next pick differs
            port = sock.getsockname()[1]
            if port not in avoid and port not in chosen:
                chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    return chosen


def can_connect(port: int, host: str = LOOPBACK, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
